//! What the tests that run the real daemon share.

use std::{path::Path, process::Child};

/// A running mapcountd, killed and reaped when the test ends, passed or not.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A self-signed certificate for localhost in `dir`: `cert.pem` and `key.pem`.
pub fn self_signed_certificate(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-keyout", "key.pem", "-out", "cert.pem"])
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
}
