//! Redis under BGSAVE: a real application forking under load, and what
//! it says about its own copy-on-write next to what mapcountd counted.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    process::ExitCode,
};

use anyhow::anyhow;

use crate::metrics::{MetricsSource, Scrape};

/// One command to a Redis server over RESP; returns the reply's text
/// (status, integer or bulk string), or its error.
pub(crate) fn redis_command(stream: &mut TcpStream, args: &[&[u8]]) -> anyhow::Result<String> {
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg);
        request.extend_from_slice(b"\r\n");
    }
    stream.write_all(&request).map_err(|e| anyhow!("redis: {e}"))?;
    let mut reader = std::io::BufReader::new(&mut *stream);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).map_err(|e| anyhow!("redis: {e}"))?;
    let line = line.trim_end().to_owned();
    match line.split_at(1) {
        ("+", text) | (":", text) => Ok(text.to_owned()),
        ("-", error) => Err(anyhow!("redis: {error}")),
        ("$", len) => {
            let len: usize = len.parse().map_err(|_| anyhow!("redis: bad reply {line}"))?;
            let mut body = vec![0u8; len + 2];
            reader.read_exact(&mut body).map_err(|e| anyhow!("redis: {e}"))?;
            body.truncate(len);
            Ok(String::from_utf8_lossy(&body).into_owned())
        }
        _ => Err(anyhow!("redis: unexpected reply {line}")),
    }
}

/// Redis forks a child for BGSAVE while this process overwrites existing
/// keys: every page the parent copies stays private to the child, which
/// Redis reports at the end as its copy-on-write ("Fork CoW for RDB:
/// current N MB", the child's Private_Dirty). The copies mapcount counts
/// meanwhile are compared with it; this process forks nothing, so they
/// are Redis's own.
pub(crate) fn redis(metrics: &MetricsSource, port: u16, log: &str, keys: u32) -> ExitCode {
    let result = (|| -> anyhow::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| anyhow!("redis: {e}"))?;
        redis_command(&mut stream, &[b"DEBUG", b"POPULATE", keys.to_string().as_bytes(), b"key", b"512"])?;
        let copies = |s: &Scrape| s.sum("mapcount_cow_faults_total", &[("outcome", "copy")]);
        let before = metrics.settled_scrape()?;
        redis_command(&mut stream, &[b"BGSAVE"])?;
        let value = vec![b'v'; 512];
        let mut written = 0u64;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        loop {
            for _ in 0..200 {
                // xorshift: keys spread over the whole data set.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let key = format!("key:{}", state % u64::from(keys));
                redis_command(&mut stream, &[b"SET", key.as_bytes(), &value])?;
                written += 1;
            }
            let info = redis_command(&mut stream, &[b"INFO", b"persistence"])?;
            if info.contains("rdb_bgsave_in_progress:0") {
                break;
            }
        }
        let after = metrics.settled_scrape()?;
        let text = fs::read_to_string(log).map_err(|e| anyhow!("{log}: {e}"))?;
        let redis_mb = text
            .lines()
            .filter_map(|l| {
                l.split_once("Fork CoW for RDB: current ")?.1.split(' ').next()?.parse::<u64>().ok()
            })
            .next_back()
            .map_or("none".to_owned(), |mb| mb.to_string());
        Ok(format!(
            "keys={keys} written={written} copies={} redis_cow_mb={redis_mb} status=ok",
            copies(&after) - copies(&before)
        ))
    })();
    match result {
        Ok(line) => {
            println!("MAPCOUNT-REDIS {line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("MAPCOUNT-REDIS status=error:{}", e.to_string().replace(' ', "_"));
            ExitCode::FAILURE
        }
    }
}
