//! f. An AF_PACKET RX ring and a BPF ring buffer mapped: driver pages
//! counted exactly, under two distinct sources.

use std::ptr;

use anyhow::anyhow;

use crate::{checker::Checker, memory::PAGE, metrics::MetricsSource};

pub(super) fn driver_pages(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let before = metrics.settled_scrape()?;
    // AF_PACKET: 4 blocks of 4 pages.
    let sock = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if sock < 0 {
        return Err(anyhow!("AF_PACKET socket: {}", std::io::Error::last_os_error()));
    }
    let (block_pages, blocks) = (4u32, 4u32);
    let req = libc::tpacket_req {
        tp_block_size: block_pages * PAGE as u32,
        tp_block_nr: blocks,
        tp_frame_size: 2048,
        tp_frame_nr: block_pages * PAGE as u32 / 2048 * blocks,
    };
    let rc = unsafe {
        libc::setsockopt(
            sock,
            libc::SOL_PACKET,
            libc::PACKET_RX_RING,
            (&raw const req).cast(),
            size_of_val(&req) as u32,
        )
    };
    if rc != 0 {
        return Err(anyhow!("PACKET_RX_RING: {}", std::io::Error::last_os_error()));
    }
    let ring_pages = (block_pages * blocks) as usize;
    let ring = unsafe {
        libc::mmap(
            ptr::null_mut(),
            ring_pages * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            sock,
            0,
        )
    };
    if ring == libc::MAP_FAILED {
        return Err(anyhow!("mmap packet ring: {}", std::io::Error::last_os_error()));
    }

    // BPF ring buffer of 4 pages: the consumer page, then the producer
    // page and the data pages mapped twice (as the kernel lays it out).
    let data_pages = 4usize;
    let fd = bpf_ringbuf_create((data_pages * PAGE) as u32)?;
    let consumer = unsafe {
        libc::mmap(ptr::null_mut(), PAGE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
    };
    let producer_len = PAGE + 2 * data_pages * PAGE;
    let producer = unsafe {
        libc::mmap(ptr::null_mut(), producer_len, libc::PROT_READ, libc::MAP_SHARED, fd, PAGE as i64)
    };
    if consumer == libc::MAP_FAILED || producer == libc::MAP_FAILED {
        return Err(anyhow!("mmap BPF ring buffer: {}", std::io::Error::last_os_error()));
    }
    let bpf_pages = 1 + 1 + 2 * data_pages;

    let after = metrics.settled_scrape()?;
    // Which source each mapping was counted under is the kernel's name
    // for it (the packet socket's protocol, the BPF map's inode name).
    let mut grown: Vec<(String, f64)> = Vec::new();
    for (series, value) in &after.0 {
        if let Some(labels) = series.strip_prefix("mapcount_nomapping_pages_mapped_total{") {
            let earlier: f64 = before.0.iter().filter(|(s, _)| s == series).map(|(_, v)| *v).sum();
            let source = labels.split("source=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
            if value - earlier > 0.0 {
                grown.push((source.to_owned(), value - earlier));
            }
        }
    }
    println!("MAPCOUNT-NOTE f_driver sources that grew: {grown:?}");
    let of = |pages: usize| {
        grown.iter().filter(|(_, d)| *d == pages as f64).map(|(s, _)| s.clone()).collect::<Vec<_>>()
    };
    let (packet, bpf) = (of(ring_pages), of(bpf_pages));
    checker.exact("f_driver/sources_growing", 2, grown.len() as f64);
    checker.exact("f_driver/packet_ring_pages_one_source", 1, packet.len() as f64);
    checker.exact("f_driver/bpf_ringbuf_pages_one_source", 1, bpf.len() as f64);
    checker.exact(
        "f_driver/bpf_ringbuf_source_is_bpf_map",
        1,
        f64::from(u8::from(bpf.iter().any(|s| s.contains("bpf")))),
    );
    let mixedmap = after.sum("mapcount_nomapping_pages_mapped_total", &[("vma", "mixedmap")])
        - before.sum("mapcount_nomapping_pages_mapped_total", &[("vma", "mixedmap")]);
    checker.exact("f_driver/mixedmap_pages", ring_pages + bpf_pages, mixedmap);
    unsafe {
        libc::munmap(ring, ring_pages * PAGE);
        libc::munmap(consumer, PAGE);
        libc::munmap(producer, producer_len);
        libc::close(fd);
        libc::close(sock);
    }
    Ok(())
}

pub(super) fn bpf_ringbuf_create(bytes: u32) -> anyhow::Result<i32> {
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries.
    let mut attr = [0u32; 32];
    attr[0] = 27; // BPF_MAP_TYPE_RINGBUF
    attr[3] = bytes;
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, 0 /* BPF_MAP_CREATE */, attr.as_mut_ptr(), size_of_val(&attr))
    };
    if fd < 0 {
        return Err(anyhow!("BPF_MAP_CREATE ringbuf: {}", std::io::Error::last_os_error()));
    }
    Ok(fd as i32)
}
