//! The daemon: load and attach, serve, ingest until a signal, then detach
//! and drain so that every record is received or counted as lost.

use std::{
    process::ExitCode,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use mapcount_common::counter;
use mapcount_daemon::{
    aggregate::Aggregator,
    http, ingest, layout,
    metrics::Metrics,
    object, privileges,
    probes::{self, KernelSymbols, Need, ProbeStatus, TracepointStatus},
    record, resources,
};

use crate::settings::{LogFilter, Settings, reload};

pub(crate) async fn run(mut args: Settings, log_filter: LogFilter) -> anyhow::Result<ExitCode> {
    let listener = http::bind(args.listen_address).await?;
    privileges::check()?;
    fit_to_host(&mut args);

    // Three reads before the verifier, each on its own core: the kernel
    // formats /proc/kallsyms line by line (40-60 ms, the longest), and the
    // kernel's BTF is read twice (the layout's reader, and aya's for
    // fentry targets).
    let (symbols, aya_btf, resolved) = std::thread::scope(|scope| {
        let symbols = scope.spawn(KernelSymbols::read);
        let aya_btf = scope.spawn(aya::Btf::from_sys_fs);
        let resolved = layout::load_btf(&args.btf).map_err(anyhow::Error::from).and_then(|btf| {
            layout::resolve(&btf).context("resolving folio field offsets from the kernel's BTF")
        });
        let joined = |name| move |_| anyhow::anyhow!("the thread reading {name} panicked");
        anyhow::Ok((
            symbols.join().map_err(joined("/proc/kallsyms"))?,
            aya_btf.join().map_err(joined("the kernel's BTF"))?,
            resolved?,
        ))
    })?;
    for field in resolved.fields.iter().filter(|f| f.offset.is_none()) {
        tracing::info!(field = field.slot, "field absent on this kernel; metrics that need it stay empty");
    }

    let symbols = symbols.context("reading /proc/kallsyms")?;
    let whole_fault_windows = probes::whole_fault_windows(&symbols);
    if whole_fault_windows {
        tracing::info!(
            "do_wp_page is not out of line in this kernel: write faults are classified over handle_mm_fault"
        );
    }
    let mut ebpf = object::load(
        &resolved.layout,
        args.ring_buffer_bytes,
        args.wakeup,
        whole_fault_windows,
        symbols.vmemmap_base_address,
    )?;
    let logger = aya_log::EbpfLogger::init(&mut ebpf).context("setting up eBPF logging")?;
    // aya's own BTF parse, for fentry targets; without it every probe uses kprobes.
    let aya_btf = match aya_btf {
        Ok(btf) => Some(btf),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read kernel BTF for fentry; using kprobes");
            None
        }
    };
    let reports =
        probes::attach_all(&mut ebpf, &symbols, aya_btf.as_ref(), args.attach_mode, whole_fault_windows)?;

    let metrics = Arc::new(Metrics::new());
    metrics.kernel_info.with_label_values(&[&kernel_release()]).set(1);
    let mut core_attached = 0;
    for report in &reports {
        let (function, mode, attached) = match &report.status {
            ProbeStatus::Attached { function, mode } => {
                tracing::info!(probe = report.spec.name, function, mode = mode.label(), "attached");
                if report.spec.need == Need::Core {
                    core_attached += 1;
                }
                (function.as_str(), mode.label(), 1)
            }
            ProbeStatus::NoFunction => {
                let candidates: Vec<_> = report.spec.candidates.iter().map(|c| c.function).collect();
                tracing::warn!(
                    probe = report.spec.name,
                    ?candidates,
                    "not attached: no such function in this kernel"
                );
                ("", "none", 0)
            }
            ProbeStatus::AttachFailed { function, error } => {
                tracing::warn!(probe = report.spec.name, function, %error, "not attached: attach failed");
                (function.as_str(), "none", 0)
            }
            ProbeStatus::NotWanted => {
                tracing::debug!(probe = report.spec.name, "not attached: not needed on this kernel");
                continue;
            }
        };
        metrics.probe_attached.with_label_values(&[report.spec.name, function, mode]).set(attached);
    }
    if core_attached == 0 {
        tracing::error!("no core rmap probe attached: mapcount metrics will stay empty on this kernel");
    }
    for report in probes::attach_tracepoints(&mut ebpf, &resolved.layout)? {
        let spec = report.spec;
        let attached = match report.status {
            TracepointStatus::Attached => {
                tracing::info!(probe = spec.name, tracepoint = spec.tracepoint, "attached");
                true
            }
            TracepointStatus::Unreadable => {
                tracing::warn!(
                    probe = spec.name,
                    tracepoint = spec.tracepoint,
                    empty = spec.feeds,
                    "not attached: the kernel's BTF does not describe the tracepoint's arguments"
                );
                false
            }
            TracepointStatus::AttachFailed(error) => {
                tracing::warn!(
                    probe = spec.name,
                    tracepoint = spec.tracepoint,
                    error = %object::error_chain(&error),
                    empty = spec.feeds,
                    "not attached: attach failed"
                );
                false
            }
        };
        if attached && spec.name == "khugepaged_shared_refusals" {
            // Zeros that mean "none seen", where the refusals are watched.
            for truth in ["exclusive", "shared", "unknown", "unnamed"] {
                metrics.khugepaged_shared_refusals.with_label_values(&[truth]);
            }
        }
        let mode = if attached { "tracepoint" } else { "none" };
        metrics
            .probe_attached
            .with_label_values(&[spec.name, spec.tracepoint, mode])
            .set(i64::from(attached));
    }

    let counters = Arc::new(object::KernelCounters::from_object(&mut ebpf)?);
    let for_scrape = Arc::clone(&counters);
    metrics.register_read_at_scrape(move |slot| for_scrape.sum(slot))?;
    let totals = object::KernelTotals::from_object(&mut ebpf)?;
    metrics.register_exact_totals(move || totals.sum())?;
    let mut events = object::event_ring(&mut ebpf)?;

    let mut aggregator = Aggregator::new(Arc::clone(&metrics), args.folio_table_size);
    aggregator.set_table_memory(args.folio_table_memory);
    aggregator.sample_from_now(args.folio_table_sample_shift);
    aggregator.name_cgroups_from_proc();
    let mut kernel_sampling = object::KernelSampling::from_object(&mut ebpf)?;
    kernel_sampling.follow(aggregator.table().sample_shift())?;
    let aggregator = Arc::new(Mutex::new(aggregator));
    let record = match &args.record {
        Some(path) => {
            let recording = record::Recording::create(path, args.record_max_size)
                .with_context(|| format!("cannot create record file {}", path.display()))?;
            metrics.recording.set(1);
            Some(recording)
        }
        None => None,
    };
    let mut sink = ingest::Sink::new(Arc::clone(&aggregator), record).with_kernel_sampling(kernel_sampling);

    let state = Arc::new(http::HttpState::new(
        Arc::new(Published(Arc::clone(&aggregator))),
        Arc::clone(&metrics),
        args.telemetry_path.clone(),
        args.web_security.clone(),
        args.web_limits,
    ));
    tracing::info!(address = %args.listen_address, "serving metrics");
    let server = tokio::spawn(http::serve(listener, state));

    // Readiness for systemd (Type=notify); a no-op outside systemd.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let reload_loop = async {
        loop {
            sighup.recv().await;
            reload(args.config_file.as_deref(), &args, &log_filter);
        }
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        result = ingest::run(&mut events, &mut sink, args.wakeup) => result.map_err(anyhow::Error::from),
        result = ingest::run_log(logger) => result.map_err(anyhow::Error::from),
        () = reload_loop => unreachable!("the reload loop never ends"),
        _ = sigterm.recv() => { tracing::info!("SIGTERM: detaching"); Ok(()) }
        _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: detaching"); Ok(()) }
    };
    server.abort();
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    // Detach first, then take what is still in the ring buffer: nothing
    // that reached it is lost at shutdown.
    let stopping = std::time::Instant::now();
    let mut events = events.into_inner();
    probes::detach_all(&mut ebpf);
    drop(ebpf);
    let detached = stopping.elapsed();
    sink.drain(&mut events)?;
    sink.finish_recording();
    tracing::info!(
        detach_ms = detached.as_millis() as u64,
        total_ms = stopping.elapsed().as_millis() as u64,
        "every program detached, ring buffer drained"
    );
    if let Some(path) = &args.dump_on_exit {
        let aggregator = aggregator.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        aggregator.publish_metrics();
        std::fs::write(path, aggregator.metrics().render())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    // Nothing runs any more and the ring buffer is empty: every record a
    // CPU produced was either received or counted as lost.
    let received =
        aggregator.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).received_per_cpu().to_vec();
    let balances = ingest::balance(
        &counters.per_cpu(counter::PRODUCED),
        &counters.per_cpu(counter::RING_BUFFER_FULL),
        &received,
    );
    for b in &balances {
        tracing::info!(
            cpu = b.cpu,
            produced = b.produced,
            received = b.received,
            lost = b.lost,
            balanced = b.balanced(),
            "event accounting"
        );
    }
    tracing::info!(
        ring_buffer_full = counters.sum(counter::RING_BUFFER_FULL),
        task_state_full = counters.sum(counter::TASK_STATE_FULL),
        unbalanced_cpus = balances.iter().filter(|b| !b.balanced()).count(),
        "events lost over the daemon's life"
    );
    outcome.map(|()| ExitCode::SUCCESS)
}

pub(crate) fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// Keeps the daemon's own bounds inside the host's: HTTP connections
/// below the open-file limit, the folio table inside a cgroup memory limit.
pub(crate) fn fit_to_host(args: &mut Settings) {
    match resources::raise_open_file_limit() {
        Ok(open_files) => {
            let fit = resources::connections_that_fit(open_files);
            if args.web_limits.max_connections > fit {
                if args.max_connections_asked {
                    tracing::warn!(
                        asked = args.web_limits.max_connections,
                        open_files,
                        "--web.max-connections lowered to fit the open-file limit"
                    );
                }
                args.web_limits.max_connections = fit;
            }
            tracing::info!(open_files, max_connections = args.web_limits.max_connections, "descriptors");
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
    args.folio_table_size = folio_table_size_for_host(args.folio_table_size);
    args.folio_table_memory = folio_table_memory_for_host(args.folio_table_memory);
}

/// `asked`, or half a cgroup memory limit if that is less.
pub(crate) fn folio_table_memory_for_host(asked: u64) -> u64 {
    let Some(limit) = resources::cgroup_memory_limit() else { return asked };
    let memory = asked.min(limit / resources::TABLE_SHARE_OF_LIMIT);
    if memory < asked {
        tracing::warn!(
            asked,
            memory,
            memory_limit = limit,
            "folio table memory lowered to half the cgroup's memory limit; beyond it small folios are sampled"
        );
    }
    memory
}

/// `asked`, or fewer if a cgroup memory limit (`MemoryMax=`) would not
/// hold that many: beyond it the table evicts and counts, rather than
/// the daemon being killed.
pub(crate) fn folio_table_size_for_host(asked: usize) -> usize {
    let limit = resources::cgroup_memory_limit();
    let size = resources::table_size_under(limit, asked);
    if size < asked {
        tracing::warn!(
            asked,
            size,
            memory_limit = limit,
            bytes_per_folio = resources::BYTES_PER_FOLIO,
            "folio table lowered to half the cgroup's memory limit; beyond it folios are evicted and counted"
        );
    }
    size
}

/// The aggregator as the HTTP endpoint sees it: published at each scrape.
struct Published(Arc<Mutex<Aggregator>>);

impl Published {
    fn lock(&self) -> std::sync::MutexGuard<'_, Aggregator> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl http::Exposition for Published {
    fn metrics_text(&self) -> String {
        let aggregator = self.lock();
        aggregator.publish_metrics();
        aggregator.metrics().render()
    }

    fn folios_of(&self, tgid: u32, max_rows: usize) -> String {
        self.lock().describe_tgid(tgid, max_rows)
    }

    fn smaps_of(&self, tgid: u32, from: u64, to: u64) -> String {
        self.lock().smaps_of(tgid, from, to).text()
    }
}
