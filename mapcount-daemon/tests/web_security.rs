//! `--web.config.file`, tested with curl against the real daemon: TLS with
//! a self-signed certificate and bcrypt basic authentication.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "an integration test: a panic is a failed test, with its message"
)]

use std::{
    net::{TcpListener, TcpStream},
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

mod common;

use common::{Daemon, self_signed_certificate};

fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("curl {args:?} -> exit {:?}, HTTP {code}", out.status.code());
    (out.status.code().unwrap_or(-1), code)
}

#[test]
#[ignore = "starts mapcountd, which needs root: run through `cargo xtask test`"]
fn tls_and_basic_auth() {
    let dir = std::env::temp_dir().join(format!("mapcount-tls-{}", std::process::id()));
    self_signed_certificate(&dir);
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    std::fs::write(
        dir.join("web.yml"),
        format!("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\nbasic_auth_users:\n  prometheus: {hash}\n"),
    )
    .unwrap();

    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");
    let _daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_mapcountd"))
            .args(["--web.listen-address", &address, "--web.config.file"])
            .arg(dir.join("web.yml"))
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(&address).is_err() {
        assert!(Instant::now() < deadline, "mapcountd did not listen on {address}");
        sleep(Duration::from_millis(100));
    }
    // The listener is bound before the programs load: wait for /-/ready.
    while curl(&["-k", "-u", "prometheus:s3cret", &format!("https://{address}/-/ready")]).1 != "200" {
        assert!(Instant::now() < deadline, "mapcountd never became ready");
        sleep(Duration::from_millis(200));
    }

    let url = format!("https://{address}/metrics");
    assert_eq!(curl(&["-k", "-u", "prometheus:s3cret", &url]), (0, "200".to_owned()));
    assert_eq!(curl(&["-k", "-u", "prometheus:wrong", &url]), (0, "401".to_owned()));
    assert_eq!(curl(&["-k", "-u", "mallory:s3cret", &url]), (0, "401".to_owned()));
    assert_eq!(curl(&["-k", &url]), (0, "401".to_owned()));
    // Plain HTTP to the TLS port gets no HTTP answer at all.
    let (exit, code) = curl(&["-u", "prometheus:s3cret", &format!("http://{address}/metrics")]);
    assert_ne!(exit, 0, "plain HTTP must fail");
    assert_eq!(code, "000");
    std::fs::remove_dir_all(&dir).unwrap();
}
