//! SIGHUP reloads the configuration file: the log level applies at once,
//! other changed keys are named as needing a restart, a broken file keeps
//! the running configuration. Runs the real daemon.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "an integration test: a panic is a failed test, with its message"
)]

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

#[test]
#[ignore = "starts mapcountd, which needs root: run through `cargo xtask test`"]
fn sighup_reloads_the_configuration() {
    let dir = std::env::temp_dir().join(format!("mapcount-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("mapcountd.toml");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");
    std::fs::write(&config, format!("[web]\nlisten_address = \"{address}\"\n[log]\nlevel = \"info\"\n"))
        .unwrap();

    let daemon = Command::new(env!("CARGO_BIN_EXE_mapcountd"))
        .arg("--config.file")
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The socket listens from the start; /-/ready is answered once the
    // programs are loaded, just before the signal handlers are set up.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = || -> bool {
        let Ok(mut stream) = TcpStream::connect(&address) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut response = String::new();
        stream.write_all(b"GET /-/ready HTTP/1.0\r\n\r\n").is_ok()
            && stream.read_to_string(&mut response).is_ok()
            && response.split_whitespace().nth(1) == Some("200")
    };
    while !ready() {
        assert!(Instant::now() < deadline, "mapcountd did not become ready");
        sleep(Duration::from_millis(100));
    }
    sleep(Duration::from_millis(500)); // into the signal loop
    let hup = |pid: u32| {
        assert!(Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success());
        sleep(Duration::from_millis(500));
    };
    std::fs::write(
        &config,
        format!("[web]\nlisten_address = \"{address}\"\n[ringbuf]\nsize = 65536\n[log]\nlevel = \"debug\"\n"),
    )
    .unwrap();
    hup(daemon.id());
    std::fs::write(&config, "[web\n").unwrap();
    hup(daemon.id());
    assert!(Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status().unwrap().success());
    let output = daemon.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    eprintln!("{log}");
    assert!(output.status.success(), "exit 0 after SIGTERM");
    assert!(
        log.contains("SIGHUP: log level applied") && log.contains("level=\"debug\""),
        "log level reloaded"
    );
    assert!(
        log.contains("key=\"ringbuf.size\"") && log.contains("takes effect after a restart"),
        "restart named"
    );
    assert!(
        log.contains("SIGHUP: configuration not reloaded, the running one stays"),
        "broken file kept out"
    );
    assert!(log.contains(":1:5: unclosed table"), "the broken file's line and column");
    std::fs::remove_dir_all(&dir).unwrap();
}
