//! The operator's view, tested end to end: Debian's Prometheus runs in the
//! guest, scrapes mapcountd while the scenarios run and evaluates the
//! shipped rules; afterwards every dashboard query and every recording rule
//! is asked for through Prometheus's HTTP API and must return series, and
//! the refcount-headroom alert must have fired.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    checks::CheckResult,
    vm,
    workspace::{cache_dir, download_with_progress, package_size, run_cmd, workspace_root},
};

/// The alert the refcount scenario (a THP mapped 1,000 times: a refcount of
/// 512,512, ratio 0.000239) is built to trigger once its threshold is
/// lowered; nothing else in the guest gets near 0.0001 (214,748 references).
pub const HEADROOM_ALERT: &str = "MapcountRefcountHeadroomLow";
const TEST_THRESHOLD: &str = "0.0001";

/// Grafana's interval variables, which Prometheus does not know.
const RATE_INTERVAL: &str = "1m";

/// One query the test asks Prometheus.
pub struct Query {
    /// "dashboard: <row> / <panel> [refId]" or "rule: <record>".
    pub name: String,
    pub expr: String,
}

/// Dashboard targets with Grafana's variables replaced (every instance and
/// release), then every recording rule by its name.
pub fn queries() -> anyhow::Result<Vec<Query>> {
    let deploy = workspace_root().join("deploy");
    let dashboard: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(deploy.join("grafana/mapcount.json"))?)
            .context("deploy/grafana/mapcount.json is not JSON")?;
    let mut queries = Vec::new();
    let mut row = String::new();
    let mut panels: Vec<&serde_json::Value> =
        dashboard["panels"].as_array().context("dashboard without panels")?.iter().collect();
    // Collapsed rows keep their panels inside the row.
    let mut i = 0;
    while i < panels.len() {
        if let Some(inner) = panels[i]["panels"].as_array() {
            for (j, p) in inner.iter().enumerate() {
                panels.insert(i + 1 + j, p);
            }
        }
        i += 1;
    }
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        if panel["type"] == "row" {
            row = title.to_owned();
            continue;
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = target["expr"].as_str() else { continue };
            let expr = expr
                .replace("$__rate_interval", RATE_INTERVAL)
                .replace("$__interval", RATE_INTERVAL)
                .replace("$__range", RATE_INTERVAL)
                .replace("$instance", ".*")
                .replace("$release", ".*");
            let ref_id = target["refId"].as_str().unwrap_or("A");
            queries.push(Query { name: format!("dashboard: {row} / {title} [{ref_id}]"), expr });
        }
    }
    if queries.is_empty() {
        bail!("the dashboard has no queries");
    }
    let rules = fs::read_to_string(deploy.join("prometheus/mapcount.rules.yml"))?;
    for line in rules.lines() {
        if let Some(record) = line.trim().strip_prefix("- record:") {
            let record = record.trim().to_owned();
            queries.push(Query { name: format!("rule: {record}"), expr: record });
        }
    }
    Ok(queries)
}

/// The shipped rules with the headroom alert's threshold and `for` lowered,
/// so that one scenario fires it within the test.
fn rules_for_test() -> anyhow::Result<String> {
    let rules = fs::read_to_string(workspace_root().join("deploy/prometheus/mapcount.rules.yml"))?;
    let mut out = String::new();
    let mut in_alert = false;
    let mut changed = 0;
    for line in rules.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("- alert:") || trimmed.starts_with("- record:") {
            in_alert = trimmed == format!("- alert: {HEADROOM_ALERT}");
        }
        if in_alert && trimmed.starts_with("expr:") {
            let (head, _) = line.rsplit_once('>').context("the headroom alert is not `ratio > threshold`")?;
            out.push_str(&format!("{head}> {TEST_THRESHOLD}\n"));
            changed += 1;
        } else if in_alert && trimmed.starts_with("for:") {
            let indent = &line[..line.len() - trimmed.len()];
            out.push_str(&format!("{indent}for: 5s\n"));
            changed += 1;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if changed != 2 {
        bail!("cannot lower {HEADROOM_ALERT}'s threshold: expected one expr and one for line");
    }
    Ok(out)
}

/// Percent-encoding for a query string value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Puts Prometheus's configuration, the test rules and the encoded queries
/// into the initramfs tree (the caller copies the binary and its libraries).
/// What a test image needs to run Prometheus: the binary, its
/// configuration (one-second scrapes and evaluations: the scenarios last
/// about a minute), the rules under test and the dashboard's queries.
pub fn image_extra() -> anyhow::Result<vm::Extra> {
    let etc = PathBuf::from("etc/prometheus");
    let config = "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - /etc/prometheus/mapcount.rules.yml\n\
         scrape_configs:\n  - job_name: mapcount\n    static_configs:\n      - targets: ['127.0.0.1:9730']\n";
    let lines: String =
        queries()?.iter().enumerate().map(|(i, q)| format!("{i} {}\n", url_encode(&q.expr))).collect();
    Ok(vm::Extra {
        binaries: vec![prometheus_binary()?],
        texts: vec![
            (etc.join("prometheus.yml"), config.to_owned()),
            (etc.join("mapcount.rules.yml"), rules_for_test()?),
            (etc.join("queries.txt"), lines),
        ],
        ..vm::Extra::default()
    })
}

/// Reads the guest's `MAPCOUNT-PROMQL <index> <json>` and alert lines.
pub fn parse(console: &str) -> anyhow::Result<Vec<CheckResult>> {
    let queries = queries()?;
    let mut results = Vec::new();
    let mut answered = vec![None; queries.len()];
    for line in console.lines() {
        if let Some(rest) = line.strip_prefix("MAPCOUNT-PROMQL ") {
            let (index, json) = rest.split_once(' ').unwrap_or((rest, ""));
            let Ok(index) = index.parse::<usize>() else { continue };
            let series = serde_json::from_str::<serde_json::Value>(json)
                .ok()
                .filter(|v| v["status"] == "success")
                .and_then(|v| v["data"]["result"].as_array().map(Vec::len));
            if let Some(slot) = answered.get_mut(index) {
                *slot = Some(series.map_or_else(|| format!("error: {}", truncate(json)), |n| n.to_string()));
            }
        }
    }
    for (query, answer) in queries.iter().zip(answered) {
        let reported = answer.unwrap_or_else(|| "no answer".to_owned());
        let passed = reported.parse::<usize>().is_ok_and(|n| n > 0);
        results.push(CheckResult {
            name: format!("prometheus/{}", query.name),
            known: "-".to_owned(),
            reported,
            accepted: ">=1 series".to_owned(),
            passed,
        });
    }
    let state = |prefix: &str| {
        console
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|json| alert_state(json, HEADROOM_ALERT))
            .unwrap_or_else(|| "no answer".to_owned())
    };
    // Inactive counts only if the rule had data to evaluate.
    let ratio_scraped = console
        .lines()
        .find_map(|l| l.strip_prefix("MAPCOUNT-PROM-RATIO-BEFORE "))
        .and_then(|json| serde_json::from_str::<serde_json::Value>(json).ok())
        .and_then(|v| v["data"]["result"].as_array().map(|r| !r.is_empty()))
        .unwrap_or(false);
    let mut before = state("MAPCOUNT-PROM-ALERTS-BEFORE ");
    if !ratio_scraped {
        before = format!("{before}, but no ratio scraped yet");
    }
    let after = state("MAPCOUNT-PROM-ALERTS-AFTER ");
    results.push(CheckResult {
        name: format!("prometheus/alert {HEADROOM_ALERT} before the scenarios"),
        known: "inactive".to_owned(),
        reported: before.clone(),
        accepted: "inactive".to_owned(),
        passed: before == "inactive",
    });
    results.push(CheckResult {
        name: format!("prometheus/alert {HEADROOM_ALERT} after the refcount scenario"),
        known: "firing".to_owned(),
        reported: after.clone(),
        accepted: "firing".to_owned(),
        passed: after == "firing",
    });
    Ok(results)
}

/// The state of `alert` in an /api/v1/alerts answer: `inactive` when it is absent.
fn alert_state(json: &str, alert: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return format!("error: {}", truncate(json));
    };
    v["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["labels"]["alertname"] == alert)
        .and_then(|a| a["state"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "inactive".to_owned())
}

fn truncate(s: &str) -> String {
    s.chars().take(120).collect()
}

/// promtool from Debian's prometheus package, unpacked into the cache (the
/// package is not installed: its scripts would start a server).
pub fn promtool() -> anyhow::Result<PathBuf> {
    Ok(prometheus_package()?.join("usr/bin/promtool"))
}

pub fn prometheus_binary() -> anyhow::Result<PathBuf> {
    Ok(prometheus_package()?.join("usr/bin/prometheus"))
}

/// Debian's prometheus package, unpacked; returns its root.
pub fn prometheus_package() -> anyhow::Result<PathBuf> {
    let dir = cache_dir().join("prometheus");
    let promtool = dir.join("root/usr/bin/promtool");
    if promtool.exists() {
        return Ok(dir.join("root"));
    }
    std::fs::create_dir_all(&dir)?;
    download_with_progress(
        Command::new("apt-get").current_dir(&dir).args([
            "download",
            "-qq",
            "-o",
            "APT::Sandbox::User=root",
            "prometheus",
        ]),
        "prometheus",
        &dir,
        package_size(Command::new("apt-cache"), "prometheus"),
    )?;
    let deb = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download prometheus left no .deb")?;
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dir.join("root")))?;
    Ok(dir.join("root"))
}

pub fn promtool_check_metrics(promtool: &Path, text: &str) -> bool {
    use std::io::Write as _;
    let Ok(mut child) = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        return false;
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(text.as_bytes());
    }
    let Ok(out) = child.wait_with_output() else { return false };
    let complaints =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !complaints.trim().is_empty() {
        println!("  promtool: {}", complaints.trim());
    }
    out.status.success() && complaints.trim().is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_promql() {
        assert_eq!(
            url_encode("sum by (a) (x{y=~\".*\"})"),
            "sum%20by%20%28a%29%20%28x%7By%3D~%22.%2A%22%7D%29"
        );
    }

    #[test]
    fn lowers_only_the_headroom_alert() {
        let rules = rules_for_test().unwrap();
        assert!(rules.contains(&format!("mapcount_refcount_headroom_ratio > {TEST_THRESHOLD}")));
        assert_eq!(rules.matches("for: 5s").count(), 1);
    }

    #[test]
    fn reads_alert_state() {
        let json = r#"{"status":"success","data":{"alerts":[{"labels":{"alertname":"MapcountRefcountHeadroomLow"},"state":"firing"}]}}"#;
        assert_eq!(alert_state(json, HEADROOM_ALERT), "firing");
        assert_eq!(alert_state(r#"{"status":"success","data":{"alerts":[]}}"#, HEADROOM_ALERT), "inactive");
    }
}
