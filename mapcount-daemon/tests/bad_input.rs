//! Bad input gets a clear error, the documented exit status, and never a
//! panic. Each case runs the real `mapcountd` binary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "an integration test: a panic is a failed test, with its message"
)]

use std::{
    io::Write as _,
    net::TcpListener,
    process::{Command, Output},
};

fn mapcountd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mapcountd")).args(args).output().expect("mapcountd runs")
}

/// Exit status and the first line of stderr that says what went wrong.
fn outcome(output: &Output) -> (i32, String) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("error") || l.contains("mapcountd:") || l.contains("ERROR"))
        .unwrap_or("")
        .to_owned();
    eprintln!("{:?} -> exit {:?}: {line}", output.status, output.status.code());
    (output.status.code().unwrap_or(-1), line)
}

fn config_file(text: &str) -> tempfile_lite::TempFile {
    let file = tempfile_lite::TempFile::new("toml");
    std::fs::File::create(&file.path).unwrap().write_all(text.as_bytes()).unwrap();
    file
}

#[test]
fn unknown_flag() {
    let (code, line) = outcome(&mapcountd(&["--no-such-flag"]));
    assert_eq!(code, 2);
    assert!(line.contains("unexpected argument '--no-such-flag'"), "{line}");
}

#[test]
fn bad_flag_value() {
    let (code, line) = outcome(&mapcountd(&["--ringbuf.size", "1000"]));
    assert_eq!(code, 2);
    assert!(line.contains("1000 is not a power of two"), "{line}");
    let (code, line) = outcome(&mapcountd(&["--ringbuf.wakeup", "sometimes"]));
    assert_eq!(code, 2);
    assert!(line.contains("invalid value 'sometimes' for '--ringbuf.wakeup <WHEN>'"), "{line}");
}

/// Values that parse but make no sense: each would once have started a
/// daemon that logs nothing, serves metrics nowhere, or tracks nothing.
#[test]
fn values_that_make_no_sense() {
    for (args, says) in [
        (&["--log.level", "shout"][..], "invalid value 'shout' for '--log.level <LEVEL>'"),
        (&["--web.telemetry-path", "nope"], "invalid value 'nope' for '--web.telemetry-path <PATH>'"),
        (&["--folio-table.size", "0"], "invalid value '0' for '--folio-table.size <N>': must be at least 1"),
        (&["--web.max-connections", "0"], "invalid value '0' for '--web.max-connections <N>'"),
        (&["--web.idle-timeout", "90"], "invalid value '90' for '--web.idle-timeout <DURATION>'"),
        (&["--record.max-size", "10"], "invalid value '10' for '--record.max-size <BYTES>'"),
        (&["replay", "x", "--folio-table.size", "0"], "invalid value '0' for '--folio-table.size <N>'"),
    ] {
        let (code, line) = outcome(&mapcountd(args));
        assert_eq!(code, 2, "{args:?}");
        assert!(line.contains(says), "{args:?}: {line}");
    }
    let file = config_file("[log]\nlevel = \"shout\"\n");
    let (code, line) = outcome(&mapcountd(&["--config.file", file.path_str()]));
    assert_eq!(code, 2);
    assert!(
        line.contains(&format!("{}:2:9: log.level: \"shout\" names no level", file.path_str())),
        "{line}"
    );
}

#[test]
fn config_syntax_error() {
    let file = config_file("[web\nlisten_address = 1\n");
    let (code, line) = outcome(&mapcountd(&["--config.file", file.path_str()]));
    assert_eq!(code, 2);
    assert!(line.contains(&format!("{}:1:", file.path_str())), "{line}");
}

#[test]
fn config_unknown_key() {
    let file = config_file("[web]\nlisten_adress = \"0.0.0.0:1\"\n");
    let (code, line) = outcome(&mapcountd(&["--config.file", file.path_str()]));
    assert_eq!(code, 2);
    assert!(line.contains(&format!("{}:2:1: unknown field `listen_adress`", file.path_str())), "{line}");
}

#[test]
fn config_bad_value() {
    let file = config_file("[attach]\nmode = \"sometimes\"\n");
    let (code, line) = outcome(&mapcountd(&["--config.file", file.path_str()]));
    assert_eq!(code, 2);
    assert!(line.contains(&format!("{}:2:8: unknown variant `sometimes`", file.path_str())), "{line}");
}

#[test]
fn config_file_missing() {
    let (code, line) = outcome(&mapcountd(&["--config.file", "/nonexistent/mapcountd.toml"]));
    assert_eq!(code, 2);
    assert!(line.contains("cannot read configuration file /nonexistent/mapcountd.toml"), "{line}");
}

#[test]
fn listen_address_in_use() {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = holder.local_addr().unwrap().to_string();
    let (code, line) = outcome(&mapcountd(&["--web.listen-address", &address]));
    assert_eq!(code, 1);
    assert!(line.contains(&format!("cannot listen on {address}")), "{line}");
    assert!(line.contains("another process holds the port"), "{line}");
}

/// Without CAP_BPF and CAP_PERFMON: as root, drop every capability first.
#[test]
fn missing_capabilities() {
    let unprivileged = |args: &[&str]| {
        let binary = env!("CARGO_BIN_EXE_mapcountd");
        if unsafe { libc::geteuid() } == 0 {
            let mut all = vec!["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", binary];
            all.extend_from_slice(args);
            Command::new("setpriv").args(all).output().expect("setpriv (util-linux) runs")
        } else {
            Command::new(binary).args(args).output().unwrap()
        }
    };
    let (code, line) = outcome(&unprivileged(&["--web.listen-address", "127.0.0.1:0"]));
    assert_eq!(code, 1);
    assert!(line.contains("mapcountd lacks CAP_BPF and CAP_PERFMON"), "{line}");
}

#[test]
fn no_btf() {
    let (code, line) = outcome(&mapcountd(&["check", "--btf", "/nonexistent/vmlinux"]));
    assert_eq!(code, 1);
    assert!(line.contains("cannot read BTF from /nonexistent/vmlinux"), "{line}");
}

#[test]
fn corrupt_record_files() {
    let truncated = tempfile_lite::TempFile::new("rec");
    // A valid header and one record length that promises more than follows.
    let mut bytes = b"MAPCOUNT".to_vec();
    bytes.extend_from_slice(&mapcount_daemon::record::VERSION.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&80u16.to_le_bytes());
    bytes.extend_from_slice(&[1; 10]);
    std::fs::write(&truncated.path, &bytes).unwrap();
    let (code, line) = outcome(&mapcountd(&["replay", truncated.path_str()]));
    assert_eq!(code, 1, "an error, not a panic (101)");
    assert!(line.contains("file ends inside a record at byte 18: truncated"), "{line}");

    let garbage = tempfile_lite::TempFile::new("rec");
    std::fs::write(&garbage.path, b"not a record file at all").unwrap();
    let (code, line) = outcome(&mapcountd(&["replay", garbage.path_str()]));
    assert_eq!(code, 1);
    assert!(line.contains("not a mapcount record file"), "{line}");
}

/// A scratch file removed when the test ends.
mod tempfile_lite {
    pub struct TempFile {
        pub path: std::path::PathBuf,
    }

    impl TempFile {
        pub fn new(extension: &str) -> TempFile {
            use std::sync::atomic::{AtomicU32, Ordering};
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("mapcount-test-{}-{n}.{extension}", std::process::id()));
            TempFile { path }
        }

        pub fn path_str(&self) -> &str {
            self.path.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
