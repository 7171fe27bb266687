//! Stock Debian kernels for the VM tests, fetched from Debian's archive with
//! a private apt configuration (the system's sources stay untouched) and
//! cached.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{cache_dir, run_cmd};

pub struct KernelSpec {
    /// Short name used on the command line.
    pub name: &'static str,
    pub suite: &'static str,
    /// Package name pattern: `{prefix}<version>{suffix}`; the newest matching package is used.
    pub prefix: &'static str,
    pub suffix: &'static str,
    /// Extra package with the modules, when the image package has none.
    pub modules_prefix: Option<&'static str>,
}

pub const KERNELS: &[KernelSpec] = &[KernelSpec {
    name: "6.12",
    suite: "trixie",
    prefix: "linux-image-6.12.",
    suffix: "+deb13-cloud-amd64-unsigned",
    modules_prefix: None,
}];

pub fn find(name: &str) -> anyhow::Result<&'static KernelSpec> {
    KERNELS.iter().find(|k| k.name == name).with_context(|| {
        let known: Vec<_> = KERNELS.iter().map(|k| k.name).collect();
        format!("unknown kernel {name}; known: {}", known.join(", "))
    })
}

/// An unpacked kernel package.
pub struct Kernel {
    pub name: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` inside the unpacked package(s).
    pub modules: PathBuf,
}

pub fn fetch(spec: &KernelSpec) -> anyhow::Result<Kernel> {
    let dir = cache_dir().join("kernels").join(spec.name);
    let unpacked = dir.join("root");
    if let Some(kernel) = locate(spec, &unpacked)? {
        return Ok(kernel);
    }
    fs::create_dir_all(&dir)?;
    let apt = PrivateApt::new(&cache_dir().join("apt"), spec.suite)?;
    let mut packages = vec![apt.newest(spec.prefix, spec.suffix)?];
    if let Some(modules_prefix) = spec.modules_prefix {
        packages.push(apt.newest(modules_prefix, spec.suffix)?);
    }
    let _ = fs::remove_dir_all(&unpacked);
    fs::create_dir_all(&unpacked)?;
    for package in &packages {
        println!("kernel {}: downloading {package}", spec.name);
        let deb = apt.download(package, &dir)?;
        run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    }
    locate(spec, &unpacked)?.with_context(|| format!("no vmlinuz in {}", packages.join(", ")))
}

fn locate(spec: &KernelSpec, root: &Path) -> anyhow::Result<Option<Kernel>> {
    let boot = root.join("boot");
    let mut vmlinuz = None;
    if let Ok(entries) = fs::read_dir(&boot) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("vmlinuz-") {
                vmlinuz = Some(e.path());
            }
        }
    }
    let modules_root = root.join("usr/lib/modules");
    let modules_root = if modules_root.exists() {
        modules_root
    } else {
        root.join("lib/modules")
    };
    let release_dir = fs::read_dir(&modules_root)
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.path());
    let Some(modules) = release_dir else {
        return Ok(None);
    };
    if vmlinuz.is_none() && modules.join("vmlinuz").exists() {
        vmlinuz = Some(modules.join("vmlinuz"));
    }
    Ok(vmlinuz.map(|vmlinuz| Kernel {
        name: spec.name.to_owned(),
        vmlinuz,
        modules,
    }))
}

struct PrivateApt {
    options: Vec<String>,
}

impl PrivateApt {
    fn new(dir: &Path, suite: &str) -> anyhow::Result<Self> {
        let lists = dir.join(format!("lists-{suite}"));
        let cache = dir.join(format!("cache-{suite}"));
        fs::create_dir_all(lists.join("partial"))?;
        fs::create_dir_all(cache.join("archives/partial"))?;
        let uri = archive_uri()?;
        let sources = dir.join(format!("{suite}.list"));
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        fs::write(
            &sources,
            format!(
                "deb [signed-by={keyring}] {uri} {suite} main\ndeb [signed-by={keyring}] {uri} {suite}-backports main\n"
            ),
        )?;
        let options = vec![
            format!("Dir::Etc::sourcelist={}", sources.display()),
            "Dir::Etc::sourceparts=-".to_owned(),
            format!("Dir::State::Lists={}", lists.display()),
            format!("Dir::Cache={}", cache.display()),
            "Dir::State::status=/dev/null".to_owned(),
            // Downloads land in our own cache directory, which _apt cannot write.
            "APT::Sandbox::User=root".to_owned(),
        ];
        let apt = Self { options };
        run_cmd(apt.cmd("apt-get").args(["update", "-qq"]))?;
        Ok(apt)
    }

    fn cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        for o in &self.options {
            cmd.arg("-o").arg(o);
        }
        cmd
    }

    /// The newest package named `{prefix}<version>{suffix}`.
    fn newest(&self, prefix: &str, suffix: &str) -> anyhow::Result<String> {
        let out = self.cmd("apt-cache").args(["pkgnames", prefix]).output()?;
        let names = String::from_utf8_lossy(&out.stdout);
        let mut candidates: Vec<&str> = names.lines().filter(|n| n.ends_with(suffix)).collect();
        candidates.sort_by_key(|n| version_key(&n[prefix.len()..n.len() - suffix.len()]));
        match candidates.last() {
            Some(n) => Ok((*n).to_owned()),
            None => bail!("no package {prefix}*{suffix} in Debian's archive"),
        }
    }

    fn download(&self, package: &str, dir: &Path) -> anyhow::Result<PathBuf> {
        run_cmd(
            self.cmd("apt-get")
                .current_dir(dir)
                .args(["download", "-qq", package]),
        )?;
        fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
            .with_context(|| format!("apt-get download {package} left no .deb"))
    }
}

/// Numeric components of a version, for ordering "117" after "99".
fn version_key(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The Debian archive this machine already uses.
fn archive_uri() -> anyhow::Result<String> {
    let sources = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    if let Some(uri) = sources
        .lines()
        .find_map(|l| l.strip_prefix("URIs:"))
        .map(|u| u.trim().to_owned())
        && !uri.contains("security")
    {
        return Ok(uri);
    }
    let list = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    list.lines()
        .filter(|l| l.starts_with("deb ") && !l.contains("security"))
        .find_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("http"))
                .map(str::to_owned)
        })
        .context("cannot find the Debian archive URI in the apt sources")
}
