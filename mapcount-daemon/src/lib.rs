//! mapcountd: per-folio mapping measurements from the kernel's rmap calls.
//!
//! The modules follow the data: [`layout`] reads the kernel's BTF (with [`btf`]),
//! [`object`] loads the eBPF object with it and [`probes`] attaches it, [`ingest`] drains the ring buffer, [`decode`] checks each
//! record, [`aggregate`] keeps the [`folios`] table and turns events into
//! [`metrics`], and [`http`] serves them; [`record`] keeps the raw stream.

pub mod aggregate;
pub mod audit;
pub mod btf;
pub mod cgroups;
pub mod config;
pub mod decode;
pub mod exposition;
pub mod folios;
pub mod http;
pub mod ingest;
pub mod layout;
pub mod log_limit;
pub mod maybe_shared;
pub mod metrics;
pub mod object;
pub mod privileges;
pub mod probes;
pub mod record;
pub mod resources;
pub mod smaps;
pub mod summary;
pub mod web_config;

/// The eBPF object built by `build.rs` from `mapcount-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mapcount"));

/// Default port of `/metrics`. Chosen from the unassigned range of the
/// Prometheus exporter port list; change it with `--web.listen-address`.
pub const DEFAULT_LISTEN_ADDRESS: std::net::SocketAddr =
    std::net::SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 9730));
