//! The source side of a migration: pre-flight, pre-copy passes with a
//! convergence estimate, the final freeze and the handover.
use crate::batch;
use crate::events::Events;
use crate::journal::{self, Entry};
use crate::state::{Agent, InFlight};
use crate::wire::{self, peer, WireError};
use crate::worker::{chain, SourceWorker};
use floe_engine::dump::StreamItem;
use floe_engine::migrate::SourceOptions;
use floe_proto::control::MigrateRequest;
use floe_proto::frame;
use floe_proto::peer::{self as pp, frame::Msg};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{0}")]
    Refused(String),
    #[error("cannot reach {peer}: {what}")]
    Connect { peer: String, what: String },
    #[error("connection to {peer} failed during {phase}")]
    Wire {
        peer: String,
        phase: String,
        #[source]
        source: WireError,
    },
    #[error("the target aborted the migration: {0}")]
    TargetAborted(String),
    #[error("{phase} timed out after {secs} s")]
    Timeout { phase: String, secs: u64 },
    #[error("engine: {0}")]
    Engine(String),
    #[error("in doubt: {0}")]
    InDoubt(String),
}

/// Statistics of one pre-copy pass, as printed (`--json`: one line each).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PassStats {
    pub event: &'static str,
    pub pass: u32,
    pub pages: u64,
    pub zero_pages: u64,
    pub page_bytes: u64,
    pub wire_bytes: u64,
    pub compressed: bool,
    /// zstd throughput of the pass (raw MiB/s per thread; 0 when not compressed).
    pub compress_mib_s: f64,
    pub frozen_ms: f64,
    pub scan_ms: f64,
    pub duration_ms: f64,
    /// Page data per second over the pass (MiB/s).
    pub rate_mib_s: f64,
    /// Estimated bytes still to send at a freeze now, and the downtime that means.
    pub remaining_bytes: u64,
    pub est_downtime_ms: f64,
}

/// Downtime split by phase, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Downtime {
    pub freeze_ms: f64,
    pub final_scan_ms: f64,
    pub final_dump_ms: f64,
    pub final_transfer_ms: f64,
    pub restore_finish_ms: f64,
    pub resume_ms: f64,
    pub total_ms: f64,
    /// Where the target's parts went, by its own clock.
    pub target: TargetPhases,
}

/// The target's side of the downtime (ms): within restore_finish_ms, the
/// final image's arrival, the network lock, the service addresses and the
/// engine's finish; within resume_ms, unlocking, releasing the tree and
/// delivering the segments dropped during the freeze.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetPhases {
    pub receive_ms: f64,
    pub lock_ms: f64,
    pub address_ms: f64,
    pub finish_ms: f64,
    pub unlock_ms: f64,
    pub release_ms: f64,
    pub reinject_ms: f64,
    pub reinjected: u32,
}

/// The final report of a migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub event: &'static str,
    pub id: String,
    pub pid: i32,
    pub target: String,
    pub target_pid: i32,
    pub dirty_tracker: String,
    pub iterations: u32,
    pub converged: bool,
    pub memory_bytes: u64,
    pub page_bytes_sent: u64,
    pub wire_bytes: u64,
    pub final_bytes: u64,
    pub total_ms: f64,
    pub precopy_ms: f64,
    pub downtime: Downtime,
}

type Send = quinn::SendStream;
type Recv = quinn::RecvStream;

struct Session<'a> {
    agent: &'a Agent,
    ev: &'a Events,
    id: String,
    peer: String,
    max_frame: u32,
    send: Send,
    recv: Recv,
    /// Service addresses removed from this host (address, interface), put back on abort.
    moved: Vec<(String, String)>,
    /// What the network lock drops on the way in: for the target on
    /// commit, or delivered here again if the source copy resumes.
    capture: Option<floe_netfilter::Capture>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Session<'_> {
    fn wire(&self, phase: &str) -> impl FnOnce(WireError) -> MigrateError + '_ {
        let (peer, phase) = (self.peer.clone(), phase.to_string());
        move |source| MigrateError::Wire { peer, phase, source }
    }

    async fn send(&mut self, phase: &str, msg: Msg) -> Result<(), MigrateError> {
        let f = peer(msg);
        wire::write_control(&mut self.send, &f).await.map_err(self.wire(phase))
    }

    /// The next frame from the target; an Abort becomes an error.
    async fn recv(&mut self, phase: &str, timeout: Duration) -> Result<Msg, MigrateError> {
        let max = self.max_frame;
        let f: pp::Frame = match tokio::time::timeout(timeout, wire::read_control(&mut self.recv, max)).await {
            Ok(r) => r.map_err(self.wire(phase))?,
            Err(_) => return Err(MigrateError::Timeout { phase: phase.into(), secs: timeout.as_secs() }),
        };
        match f.msg {
            Some(Msg::Abort(a)) => Err(MigrateError::TargetAborted(a.reason)),
            Some(m) => Ok(m),
            None => Err(MigrateError::Wire {
                peer: self.peer.clone(),
                phase: phase.into(),
                source: WireError::Unexpected { expected: "a message", got: "an empty frame".into() },
            }),
        }
    }
}

fn unexpected(phase: &str, peer: &str, expected: &'static str, got: Msg) -> MigrateError {
    MigrateError::Wire {
        peer: peer.to_string(),
        phase: phase.to_string(),
        source: WireError::Unexpected { expected, got: wire::frame_name(&peer_frame(got)) },
    }
}

fn peer_frame(m: Msg) -> pp::Frame {
    pp::Frame { msg: Some(m) }
}

/// Runs one migration end to end. On any failure before the commit the
/// source tree runs on (it never stopped, or it is resumed).
pub async fn migrate(agent: Arc<Agent>, req: MigrateRequest, ev: Events) -> Result<Report, MigrateError> {
    let id = journal::new_id();
    let (addr, name) = agent.cfg.resolve_peer(&req.to).map_err(|e| MigrateError::Refused(e.to_string()))?;
    if name == agent.cfg.name {
        return Err(MigrateError::Refused(format!("{name} is this host; migrate to another one")));
    }
    if !std::path::Path::new(&format!("/proc/{}", req.pid)).exists() {
        return Err(MigrateError::Refused(format!("no process {}", req.pid)));
    }
    let busy = agent.list().len();
    if busy >= agent.cfg.limits.max_concurrent_migrations {
        return Err(MigrateError::Refused(format!(
            "{busy} migrations already in flight on this agent (limits.max_concurrent_migrations); retry later"
        )));
    }
    agent.begin(InFlight::new(&id, "source", req.pid, &name, "connect"));
    let mut entry = Entry {
        id: id.to_string(),
        role: "source".into(),
        pid: req.pid,
        host_pid: req.pid,
        start_time: journal::start_time(req.pid).unwrap_or(0),
        peer: name.to_string(),
        peer_addr: addr.to_string(),
        tree_pids: Vec::new(),
        state: "started".into(),
        updated_unix_ms: 0,
    };
    record(&agent, &mut entry, "started");
    let r = run(&agent, &req, &ev, &id, addr, &name, &mut entry).await;
    if r.is_err() && entry.state == "started" {
        // Failed before anything was frozen for good: the process runs here.
        record(&agent, &mut entry, "aborted");
    }
    if entry.state != "committing" {
        agent.end(&id);
    }
    r
}

async fn run(
    agent: &Arc<Agent>,
    req: &MigrateRequest,
    ev: &Events,
    id: &str,
    addr: std::net::SocketAddr,
    name: &str,
    entry: &mut Entry,
) -> Result<Report, MigrateError> {
    let t_start = Instant::now();
    ev.phase("connect", &format!("{name} at {addr}")).await;
    let conn = connect(agent, addr, name).await?;
    let (send, recv) =
        conn.open_bi().await.map_err(|e| MigrateError::Connect { peer: name.into(), what: e.to_string() })?;
    let mut s = Session {
        agent,
        ev,
        id: id.to_string(),
        peer: name.to_string(),
        max_frame: agent.cfg.limits.max_frame_bytes,
        send,
        recv,
        moved: Vec::new(),
        capture: None,
    };
    let version = agent.hooks.protocol_version.unwrap_or(frame::PROTOCOL_VERSION);
    s.send(
        "hello",
        Msg::Hello(pp::Hello {
            protocol_version: version,
            floe_version: env!("CARGO_PKG_VERSION").into(),
            source: agent.cfg.name.clone(),
            migration_id: id.to_string(),
            max_frame: s.max_frame,
        }),
    )
    .await?;
    match s.recv("hello", Duration::from_secs(10)).await? {
        Msg::HelloReply(r) if r.error.is_empty() => {
            if r.max_frame < floe_engine::dump::STREAM_BATCH_BYTES as u32 {
                return Err(MigrateError::Refused(format!(
                    "{name} accepts frames of at most {} bytes; page batches need {} (raise limits.max_frame_bytes there)",
                    r.max_frame,
                    floe_engine::dump::STREAM_BATCH_BYTES
                )));
            }
            // Frames both sides accept.
            s.max_frame = s.max_frame.min(r.max_frame);
            if r.protocol_version != frame::PROTOCOL_VERSION {
                return Err(MigrateError::Refused(format!(
                    "{name} speaks peer protocol version {}, this agent {}",
                    r.protocol_version,
                    frame::PROTOCOL_VERSION
                )));
            }
        }
        Msg::HelloReply(r) => return Err(MigrateError::Refused(format!("{name} refused the migration: {}", r.error))),
        other => return Err(unexpected("hello", name, "hello reply", other)),
    }

    // Pre-flight: nothing is stopped until the target says it can take the tree.
    ev.phase("preflight", "checking the target before anything stops").await;
    let (pid, new_pidns, moving) = (req.pid, req.new_pidns, req.move_address.clone());
    for m in &moving {
        crate::netaddr::parse(m).map_err(|e| MigrateError::Refused(e.to_string()))?;
    }
    let facts = tokio::task::spawn_blocking(move || floe_engine::migrate::preflight::gather(pid, new_pidns, &moving))
        .await
        .map_err(|e| MigrateError::Engine(e.to_string()))?
        .map_err(|e| MigrateError::Refused(chain(&e)))?;
    let memory_bytes = facts.memory_bytes;
    entry.tree_pids = facts.pids.clone();
    s.send("preflight", Msg::Preflight(facts)).await?;
    match s.recv("preflight", Duration::from_secs(120)).await? {
        Msg::PreflightReply(r) if r.problems.is_empty() => {}
        Msg::PreflightReply(r) => {
            return Err(MigrateError::Refused(format!(
                "{name} cannot take process {pid} (nothing was stopped): {}",
                r.problems.join("; ")
            )))
        }
        other => return Err(unexpected("preflight", name, "preflight reply", other)),
    }
    // Deleted files the tree maps or runs go first: the target maps them in
    // its staged tree (pass 0's state names them by dev and inode).
    let deleted = tokio::task::spawn_blocking(move || floe_engine::migrate::preflight::deleted_files(pid))
        .await
        .map_err(|e| MigrateError::Engine(e.to_string()))?
        .map_err(|e| MigrateError::Refused(chain(&e)))?;
    for d in &deleted {
        send_deleted(&mut s, d).await?;
    }
    let opts = SourceOptions {
        pid,
        dirty_tracker: req.dirty_tracker.clone(),
        file_locks: req.file_locks,
        ext_unix_sk: req.ext_unix_sk,
        tcp_established: req.tcp_established,
    };
    let worker = tokio::task::spawn_blocking(move || SourceWorker::start(opts))
        .await
        .map_err(|e| MigrateError::Engine(e.to_string()))?
        .map_err(MigrateError::Refused)?;
    let outcome = precopy_and_handover(&mut s, &worker, req, memory_bytes, t_start, entry).await;
    match outcome {
        Ok(report) => Ok(report),
        Err(e) if entry.state == "committing" => {
            // Commit sent, no confirmation: find out before touching the source copy.
            let deadline = Duration::from_secs(agent.cfg.limits.in_doubt_timeout_s);
            ev.warning(&format!("commit not confirmed ({e}); asking {name} what it did")).await;
            agent.set_phase(id, "in doubt", 0, 0);
            match resolve_in_doubt(agent, &worker, addr, name, entry, Some(deadline)).await {
                Some(Ok(())) => {
                    ev.warning(&format!("{name} confirmed on a second connection that the process runs there; the source copy was killed (timings are incomplete)")).await;
                    Ok(Report {
                        event: "report",
                        id: id.to_string(),
                        pid: req.pid,
                        target: name.to_string(),
                        target_pid: req.pid,
                        dirty_tracker: worker.tracker.clone(),
                        memory_bytes,
                        total_ms: t_start.elapsed().as_secs_f64() * 1000.0,
                        ..Default::default()
                    })
                }
                Some(Err(r)) => Err(r),
                None => {
                    // Still unknown: keep the source copy frozen and keep asking in the background.
                    let a = agent.clone();
                    let name = name.to_string();
                    let mut entry = entry.clone();
                    tokio::spawn(async move {
                        let _ = resolve_in_doubt(&a, &worker, addr, &name, &mut entry, None).await;
                        a.end(&entry.id);
                    });
                    Err(MigrateError::InDoubt(format!(
                        "no answer from the target within {} s; the source copy stays frozen (not running) while this agent keeps asking; see `floe status` and docs/operations.md",
                        deadline.as_secs()
                    )))
                }
            }
        }
        Err(e) => {
            let reason = e.to_string();
            let _ = s.send("abort", Msg::Abort(pp::Abort { reason: reason.clone() })).await;
            let _ = s.send.finish();
            for (cidr, dev) in std::mem::take(&mut s.moved) {
                let c = cidr.clone();
                let hook = agent.cfg.address_hook.clone();
                let dev = (!dev.is_empty()).then_some(dev);
                match tokio::task::spawn_blocking(move || crate::netaddr::add(&c, dev.as_deref(), hook.as_deref()))
                    .await
                {
                    Ok(Ok(_)) => {}
                    _ => ev.warning(&format!("could not put {cidr} back on this host; add it by hand")).await,
                }
            }
            let resumed = worker.resume().await;
            record(agent, entry, "aborted");
            drop(worker);
            match resumed {
                Err(r) => ev.warning(&format!("resuming the source process failed: {r}")).await,
                // The connections run here again: what their peers sent while
                // they were locked arrives now instead of on their timers.
                Ok(()) => {
                    if let Some(mut c) = s.capture.take() {
                        let segs = c.drain();
                        if !segs.is_empty() {
                            if let Err(err) = floe_netfilter::reinject(&segs, floe_engine::dump::NET_LOCK_MARK) {
                                tracing::warn!(error = %chain(&err), "cannot deliver the segments dropped during the freeze");
                            }
                        }
                        crate::state::drop_elsewhere(c);
                    }
                }
            }
            Err(e)
        }
    }
}

fn record(agent: &Agent, e: &mut Entry, state: &str) {
    e.state = state.to_string();
    if let Err(err) = agent.journal.record(e) {
        tracing::error!(id = %e.id, state, error = %err, "cannot write the migration journal");
    }
}

async fn connect(agent: &Agent, addr: std::net::SocketAddr, name: &str) -> Result<quinn::Connection, MigrateError> {
    let err = |what: String| MigrateError::Connect { peer: name.to_string(), what };
    // Full-size packets from the start on a jumbo-frame link (the path's real MTU).
    let mut tuning = agent.tuning.clone();
    if let Some(mtu) = crate::tls::link_mtu_for(addr.ip()) {
        let t = crate::tls::Tuning::for_path_mtu(mtu);
        tuning.initial_mtu = t.initial_mtu;
        tuning.max_mtu = tuning.max_mtu.max(t.max_mtu);
    }
    let cfg = crate::tls::client_config(&agent.identity, &tuning).map_err(|e| err(chain(&e)))?;
    let connecting = agent.endpoint.connect_with(cfg, addr, name).map_err(|e| err(e.to_string()))?;
    match tokio::time::timeout(Duration::from_secs(10), connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => {
            Err(err(format!("{e} (is floe-agent running there, with a certificate from the same cluster CA?)")))
        }
        Err(_) => Err(err("no answer within 10 s".into())),
    }
}

/// A page buffer lent to the QUIC stream; back to the engine when dropped.
struct Returned {
    buf: Vec<u8>,
    to: floe_engine::dump::Recycler,
}

impl AsRef<[u8]> for Returned {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Returned {
    fn drop(&mut self) {
        let _ = self.to.send(std::mem::take(&mut self.buf));
    }
}

/// Counters a pass's page consumer fills (on the engine's stream thread).
#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    pages: AtomicU64,
    zero_pages: AtomicU64,
    page_bytes: AtomicU64,
    wire_bytes: AtomicU64,
    compress_ns: AtomicU64,
    compress_in: AtomicU64,
}

#[allow(clippy::too_many_arguments)]
async fn precopy_and_handover(
    s: &mut Session<'_>,
    worker: &SourceWorker,
    req: &MigrateRequest,
    memory_bytes: u64,
    t_start: Instant,
    entry: &mut Entry,
) -> Result<Report, MigrateError> {
    let max_downtime = if req.max_downtime_ms == 0 { 50.0 } else { req.max_downtime_ms as f64 };
    let max_iter = if req.max_iterations == 0 { 30 } else { req.max_iterations };
    let abort_on_nc = match req.on_no_convergence.as_str() {
        "" | "freeze" => false,
        "abort" => true,
        o => return Err(MigrateError::Refused(format!("--on-no-convergence must be freeze or abort, not {o}"))),
    };
    let compress_mode = match req.compress.as_str() {
        "" | "auto" => None,
        "on" => Some(true),
        "off" => Some(false),
        o => return Err(MigrateError::Refused(format!("--compress must be auto, on or off, not {o}"))),
    };
    let mut report = Report {
        event: "report",
        id: s.id.clone(),
        pid: req.pid,
        target: s.peer.clone(),
        dirty_tracker: worker.tracker.clone(),
        memory_bytes,
        ..Default::default()
    };
    let batch_no = Arc::new(AtomicU64::new(0));
    let mut link_rate = 0f64; // wire bytes/s
    let mut compress_rate = 200e6; // raw bytes/s of one zstd-1 thread (measured when used)
    let mut prev: Option<PassStats> = None;
    let mut fixed_ms = 5.0;
    let mut converged = false;
    let mut pass = 0u32;
    loop {
        // Judged on pass 0's rate: small passes measure latency more than the link.
        let compress = compress_mode.unwrap_or(pass > 0 && link_rate > 0.0 && compress_rate > link_rate * 1.1);
        s.ev.phase("precopy", &format!("pass {pass}")).await;
        s.agent.set_phase(&s.id, "precopy", pass, report.wire_bytes);
        let st = run_pass(s, worker, pass, compress, &batch_no).await?;
        report.page_bytes_sent += st.page_bytes;
        report.wire_bytes += st.wire_bytes;
        if st.duration_ms > 0.0 && (pass == 0 || st.wire_bytes >= 64 << 20) {
            link_rate = st.wire_bytes as f64 / (st.duration_ms / 1000.0);
        }
        if pass == 0 {
            // The final freeze collects the whole state again, as pass 0 did.
            fixed_ms = st.frozen_ms + 5.0;
        }
        let mut st = st;
        if st.compress_mib_s > 0.0 {
            compress_rate = st.compress_mib_s * (1 << 20) as f64;
        }
        // Pages dirtied while this pass ran are what the next one (or the freeze) must move.
        let rate = link_rate.max(1.0);
        st.remaining_bytes = match &prev {
            None => st.page_bytes / 10,
            Some(p) => (st.page_bytes as f64 * (st.duration_ms / p.duration_ms.max(1.0)).min(4.0)) as u64,
        };
        st.est_downtime_ms = st.remaining_bytes as f64 / rate * 1000.0 + fixed_ms;
        s.ev.emit("pass", &st).await;
        // Pass 0's estimate is a guess (it moved everything): compare from pass 1 on.
        let shrinking = pass < 2 || prev.as_ref().is_none_or(|p| st.est_downtime_ms < p.est_downtime_ms * 0.95);
        pass += 1;
        // Within --max-downtime, one more pass still pays while the pages
        // left take more than a couple of milliseconds to move and the
        // last pass at least halved them: it costs no downtime.
        let transfer_ms = st.remaining_bytes as f64 / rate * 1000.0;
        let halving = prev.as_ref().is_none_or(|p| st.remaining_bytes * 2 <= p.remaining_bytes);
        let worth_another = transfer_ms > 2.0 && halving && pass < max_iter;
        if pass >= 2 && st.est_downtime_ms <= max_downtime && !worth_another {
            converged = true;
            break;
        }
        if pass >= 2 && (!shrinking || pass >= max_iter) {
            let why = if pass >= max_iter {
                format!("{pass} passes done (--max-iterations)")
            } else {
                "the dirty rate keeps up with the link".to_string()
            };
            if abort_on_nc {
                return Err(MigrateError::Refused(format!(
                    "pre-copy does not converge ({why}): expected downtime {:.1} ms > --max-downtime {max_downtime} ms; aborted as --on-no-convergence abort asks (the process kept running)",
                    st.est_downtime_ms
                )));
            }
            s.ev.warning(&format!(
                "pre-copy does not converge ({why}); freezing anyway, expected downtime {:.1} ms (--max-downtime {max_downtime} ms)",
                st.est_downtime_ms
            ))
            .await;
            break;
        }
        prev = Some(st);
    }
    report.iterations = pass;
    report.converged = converged;
    report.precopy_ms = ms(t_start.elapsed());

    // Final: freeze for good, send the rest, hand over.
    s.ev.phase("freeze", "final pass").await;
    s.agent.set_phase(&s.id, "final", pass, report.wire_bytes);
    let dir = s.agent.run_dir.join(format!("mig-{}", s.id));
    let t_freeze = Instant::now();
    // The network lock is prepared before the freeze; its elements go in
    // inside it. What it drops on the way in is kept for the target.
    let (lock, capture) = if req.tcp_established {
        let name = format!("floe_mig_{}", &s.id[..16]);
        let (l, c) = floe_netfilter::Lock::prepare_capturing(&name, floe_engine::dump::NET_LOCK_MARK)
            .map_err(|e| MigrateError::Engine(chain(&e)))?;
        (Some(l), c)
    } else {
        (None, None)
    };
    s.capture = capture;
    // The final pass: the last pages stream like a pass's (and are written
    // on the target as they arrive) while the rest of the state goes to `dir`.
    let compress = compress_mode.unwrap_or(link_rate > 0.0 && compress_rate > link_rate * 1.1);
    let d2 = dir.clone();
    let (fst, (fo, engine_done)) = stream_pass(s, pass, compress, &batch_no, move |c| async move {
        let r = worker.freeze_final(d2, lock, c).await;
        r.map(|fo| (fo, Instant::now()))
    })
    .await?;
    // Downtime counts from the freeze itself (the lock was prepared before it).
    let frozen_for = Duration::from_secs_f64(fo.report.timings.frozen_ms.max(0.0) / 1000.0);
    let t_freeze = engine_done.checked_sub(frozen_for).unwrap_or(t_freeze);
    let streamed_at = Instant::now();
    // Service addresses leave this host now (the connections are read and locked).
    for cidr in &req.move_address {
        let c = cidr.clone();
        let hook = s.agent.cfg.address_hook.clone();
        let dev = tokio::task::spawn_blocking(move || crate::netaddr::remove(&c, hook.as_deref()))
            .await
            .map_err(|e| MigrateError::Engine(e.to_string()))?
            .map_err(|e| MigrateError::Refused(e.to_string()))?;
        s.moved.push((cidr.clone(), dev));
    }
    let t = &fo.report.timings;
    tracing::info!(id = %s.id, timings = ?t, page_bytes = fo.report.page_bytes, "final dump done");
    report.downtime.freeze_ms = t.freeze_ms;
    report.downtime.final_scan_ms = t.collect_ms;
    report.downtime.final_dump_ms = t.memory_ms + t.commit_ms;
    let t_send = Instant::now();
    let sent = send_final(s, &dir, &fo.report.present, compress).await;
    let _ = std::fs::remove_dir_all(&dir);
    report.final_bytes = sent? + fst.wire_bytes;
    report.page_bytes_sent += fst.page_bytes;
    report.wire_bytes += report.final_bytes;
    // The pages' tail in flight after the engine was done, the target's
    // acknowledgement of them, then the state.
    report.downtime.final_transfer_ms = ms(streamed_at.duration_since(engine_done)) + ms(t_send.elapsed());
    s.agent.set_phase(&s.id, "restore", pass, report.wire_bytes);
    let t_wait = Instant::now();
    let ready = match s.recv("final restore", Duration::from_secs(120)).await? {
        Msg::Ready(r) => r,
        other => return Err(unexpected("final restore", &s.peer, "ready", other)),
    };
    report.downtime.restore_finish_ms = ms(t_wait.elapsed());
    let tp = &mut report.downtime.target;
    (tp.receive_ms, tp.lock_ms, tp.address_ms, tp.finish_ms) =
        (ready.receive_ms, ready.lock_ms, ready.address_ms, ready.finish_ms);

    // Point of no return: from here the source copy never runs unless the
    // target says it discarded its own. Parked first, so that it stays
    // stopped even if this agent dies before the outcome is known.
    worker.park().await.map_err(MigrateError::Engine)?;
    record(s.agent, entry, "committing");
    s.ev.phase("commit", "target is ready; handing over").await;
    let t_commit = Instant::now();
    // The service address lives on the target now: what reached this host
    // meanwhile goes along.
    let received = s.capture.as_mut().map(|c| crate::received::to_wire(&c.drain())).unwrap_or_default();
    // Closing a netlink socket can take the kernel ~10 ms: not here.
    if let Some(c) = s.capture.take() {
        crate::state::drop_elsewhere(c);
    }
    s.send("commit", Msg::Commit(pp::Commit { received })).await?;
    let done = match s.recv("commit", Duration::from_secs(s.agent.cfg.limits.in_doubt_timeout_s)).await? {
        Msg::Done(d) => d,
        other => return Err(unexpected("commit", &s.peer, "done", other)),
    };
    report.downtime.resume_ms = ms(t_commit.elapsed());
    let tp = &mut report.downtime.target;
    (tp.unlock_ms, tp.release_ms, tp.reinject_ms, tp.reinjected) =
        (done.unlock_ms, done.release_ms, done.reinject_ms, done.reinjected);
    report.downtime.total_ms = ms(t_freeze.elapsed());
    report.target_pid = done.pid;
    if let Err(e) = worker.kill().await {
        s.ev.warning(&format!("the source copy could not be killed: {e}")).await;
    }
    record(s.agent, entry, "committed");
    let _ = s.send.finish();
    report.total_ms = ms(t_start.elapsed());
    Ok(report)
}

/// Streams one pass: the engine reads pages on its threads while this task
/// writes the frames; waits for the target's acknowledgement.
async fn run_pass(
    s: &mut Session<'_>,
    worker: &SourceWorker,
    pass: u32,
    compress: bool,
    batch_no: &Arc<AtomicU64>,
) -> Result<PassStats, MigrateError> {
    let (st, rep) = stream_pass(s, pass, compress, batch_no, |c| worker.pass(c)).await?;
    Ok(PassStats { frozen_ms: rep.frozen_ms, scan_ms: rep.scan_ms, ..st })
}

/// Streams one pass's pages to the target: `engine` is given the consumer
/// that encodes them into batches, which go out as they come; then
/// PassEnd, and the target's PassAck once it has written them all.
/// Returns the pass's figures (frozen_ms and scan_ms left 0) and what
/// `engine` returned.
async fn stream_pass<T, F, Fut>(
    s: &mut Session<'_>,
    pass: u32,
    compress: bool,
    batch_no: &Arc<AtomicU64>,
    engine: F,
) -> Result<(PassStats, T), MigrateError>
where
    F: FnOnce(floe_engine::dump::ChunkConsumer) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let t0 = Instant::now();
    // Frames to write, in order, and where to give a page buffer back once written.
    type Out = (Vec<Vec<u8>>, Option<floe_engine::dump::Recycler>);
    let (ftx, mut frx) = tokio::sync::mpsc::channel::<Out>(8);
    let counters = Arc::new(Counters::default());
    let c2 = counters.clone();
    let bn = batch_no.clone();
    let corrupt_at = s.agent.hooks.corrupt_batch;
    let consumer: floe_engine::dump::ChunkConsumer = Box::new(move |item: StreamItem| {
        let out: Out = match item {
            StreamItem::State(m) => {
                (vec![frame::control(&peer(Msg::PassStart(pp::PassStart { pass, manifest: Some(*m) })))], None)
            }
            StreamItem::Layout(p) => {
                (vec![frame::control(&peer(Msg::Layout(pp::Layout { pass, process: Some(p) })))], None)
            }
            StreamItem::Pages(chunk) => {
                let n = bn.fetch_add(1, Ordering::Relaxed) + 1;
                let recycle = chunk.recycle.clone();
                let t = Instant::now();
                let (enc, spare) = batch::encode(pass, chunk, compress, corrupt_at == Some(n));
                if compress {
                    c2.compress_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    c2.compress_in.fetch_add(enc.raw_bytes, Ordering::Relaxed);
                }
                let give_back = if spare.is_empty() {
                    Some(recycle)
                } else {
                    let _ = recycle.send(spare);
                    None
                };
                c2.batches.fetch_add(1, Ordering::Relaxed);
                c2.pages.fetch_add(enc.pages, Ordering::Relaxed);
                c2.zero_pages.fetch_add(enc.zero_pages, Ordering::Relaxed);
                c2.page_bytes.fetch_add(enc.pages * 4096, Ordering::Relaxed);
                c2.wire_bytes.fetch_add((enc.prefix.len() + enc.data.len()) as u64, Ordering::Relaxed);
                (vec![enc.prefix, enc.data], give_back)
            }
        };
        ftx.blocking_send(out).map_err(|_| std::io::Error::other("connection to the target is gone"))
    });
    let peer_name = s.peer.clone();
    let send = &mut s.send;
    let drain = async {
        while let Some((parts, recycle)) = frx.recv().await {
            // Page data goes to the stream without a copy; its buffer returns
            // to the engine once the stream is done with it.
            let mut recycle = recycle;
            for (i, p) in parts.into_iter().enumerate() {
                let lent = if i == 1 { recycle.take() } else { None };
                let bytes = match lent {
                    Some(to) => bytes::Bytes::from_owner(Returned { buf: p, to }),
                    None => bytes::Bytes::from(p),
                };
                wire::write_chunk(send, bytes).await?;
            }
        }
        Ok::<(), WireError>(())
    };
    let max = s.max_frame;
    let recv = &mut s.recv;
    // The target says nothing during a pass unless it gives up: watch for that.
    let watch = async { wire::read_control::<_, pp::Frame>(recv, max).await };
    let both = async { tokio::join!(engine(consumer), drain) };
    let (rep, drained) = tokio::select! {
        r = both => r,
        w = watch => {
            return Err(match w {
                Ok(pp::Frame { msg: Some(Msg::Abort(a)) }) => MigrateError::TargetAborted(a.reason),
                Ok(f) => MigrateError::Wire {
                    peer: peer_name,
                    phase: format!("pre-copy pass {pass}"),
                    source: WireError::Unexpected { expected: "nothing during a pass", got: wire::frame_name(&f) },
                },
                Err(e) => MigrateError::Wire { peer: peer_name, phase: format!("pre-copy pass {pass}"), source: e },
            });
        }
    };
    if let Err(e) = drained {
        return Err(MigrateError::Wire { peer: peer_name, phase: format!("pre-copy pass {pass}"), source: e });
    }
    let rep = rep.map_err(MigrateError::Engine)?;
    let c = &counters;
    s.send(
        "pre-copy",
        Msg::PassEnd(pp::PassEnd {
            pass,
            batches: c.batches.load(Ordering::Relaxed) as u32,
            pages: c.pages.load(Ordering::Relaxed),
        }),
    )
    .await?;
    match s.recv("pre-copy", Duration::from_secs(300)).await? {
        Msg::PassAck(a) if a.pass == pass => {}
        other => return Err(unexpected("pre-copy", &s.peer, "pass ack", other)),
    }
    let duration_ms = ms(t0.elapsed());
    let page_bytes = c.page_bytes.load(Ordering::Relaxed);
    let st = PassStats {
        event: "pass",
        pass,
        pages: c.pages.load(Ordering::Relaxed),
        zero_pages: c.zero_pages.load(Ordering::Relaxed),
        page_bytes,
        wire_bytes: c.wire_bytes.load(Ordering::Relaxed),
        compressed: compress,
        compress_mib_s: {
            let ns = c.compress_ns.load(Ordering::Relaxed);
            if ns == 0 {
                0.0
            } else {
                c.compress_in.load(Ordering::Relaxed) as f64 / (1 << 20) as f64 / (ns as f64 / 1e9)
            }
        },
        frozen_ms: 0.0,
        scan_ms: 0.0,
        duration_ms,
        rate_mib_s: page_bytes as f64 / (1 << 20) as f64 / (duration_ms / 1000.0).max(1e-6),
        remaining_bytes: 0,
        est_downtime_ms: 0.0,
    };
    Ok((st, rep))
}

/// Sends the final image's files. Returns the bytes sent.
/// One deleted file: its description, then its contents in chunks.
async fn send_deleted(
    s: &mut Session<'_>,
    d: &floe_engine::migrate::preflight::DeletedContents,
) -> Result<(), MigrateError> {
    tracing::info!(path = %d.path, bytes = d.data.len(), "sending a deleted file the tree maps or runs");
    let desc = pp::DeletedFile {
        dev: d.id.0,
        ino: d.id.1,
        size: d.data.len() as u64,
        blake3: blake3::hash(&d.data).as_bytes().to_vec(),
        path: d.path.clone(),
    };
    s.send("deleted files", Msg::DeletedFile(desc)).await?;
    let chunk = (s.max_frame as usize / 2).max(4096);
    for (i, part) in d.data.chunks(chunk).enumerate() {
        let msg =
            Msg::FileChunk(pp::FileChunk { file: 2, offset: (i * chunk) as u64, data: part.to_vec(), zstd: false });
        s.send("deleted files", msg).await?;
    }
    Ok(())
}

async fn send_final(
    s: &mut Session<'_>,
    dir: &std::path::Path,
    present: &[(i32, Vec<(u64, u64)>)],
    compress: bool,
) -> Result<u64, MigrateError> {
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| MigrateError::Engine(format!("cannot read the final image: {e}")))
    };
    let manifest = read(floe_engine::image::MANIFEST_FILE)?;
    let pages = read(floe_engine::image::PAGES_FILE)?;
    s.send(
        "final transfer",
        Msg::FinalImage(pp::FinalImage {
            manifest_len: manifest.len() as u64,
            pages_len: pages.len() as u64,
            addresses: s.moved.iter().map(|(c, _)| c.clone()).collect(),
            manifest_blake3: blake3::hash(&manifest).as_bytes().to_vec(),
            pages_blake3: blake3::hash(&pages).as_bytes().to_vec(),
            present: present
                .iter()
                .map(|(pid, r)| pp::Present { pid: *pid, ranges: r.iter().flat_map(|&(a, b)| [a, b]).collect() })
                .collect(),
        }),
    )
    .await?;
    let chunk = (s.max_frame as usize / 2).max(4096);
    let mut wire = 0u64;
    for (file, data) in [(0u32, &manifest), (1, &pages)] {
        for (i, part) in data.chunks(chunk).enumerate() {
            // Kept only when it saves at least an eighth.
            let z = compress
                .then(|| zstd::bulk::compress(part, 1).ok())
                .flatten()
                .filter(|z| z.len() < part.len() - part.len() / 8);
            let (data, zstd) = match z {
                Some(z) => (z, true),
                None => (part.to_vec(), false),
            };
            wire += data.len() as u64;
            let msg = Msg::FileChunk(pp::FileChunk { file, offset: (i * chunk) as u64, data, zstd });
            s.send("final transfer", msg).await?;
        }
    }
    Ok(wire)
}

/// Commit was sent but not confirmed. Asks the target (on new connections)
/// what it did, and only then kills or resumes the source copy, which stays
/// frozen (and parked) meanwhile. Ok: the process runs on the target (the
/// source copy was killed). None: no answer before `deadline`.
pub async fn resolve_in_doubt(
    agent: &Agent,
    worker: &SourceWorker,
    addr: std::net::SocketAddr,
    name: &str,
    entry: &mut Entry,
    deadline: Option<Duration>,
) -> Option<Result<(), MigrateError>> {
    let t0 = Instant::now();
    let id = entry.id.clone();
    while deadline.is_none_or(|d| t0.elapsed() < d) {
        match query(agent, addr, name, &id).await {
            Ok(outcome) if outcome == "released" => {
                let _ = worker.kill().await;
                record(agent, entry, "committed");
                return Some(Ok(()));
            }
            Ok(outcome) if outcome == "discarded" || outcome == "unknown" => {
                let r = worker.resume().await;
                record(agent, entry, "aborted");
                return Some(Err(MigrateError::InDoubt(format!(
                    "{name} did not run the process ({outcome}); the source copy was resumed{}",
                    r.err().map(|e| format!(" (resume failed: {e})")).unwrap_or_default()
                ))));
            }
            Ok(other) => tracing::info!(id, outcome = %other, "target still deciding"),
            Err(e) => tracing::info!(id, error = %e, "in-doubt query failed; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    None
}

/// After a restart: migrations this agent left "committing". Their source
/// copies are parked (stopped by a queued SIGSTOP when the agent died);
/// each is killed or continued once the target says what it did.
pub fn resolve_after_restart(agent: Arc<Agent>) {
    for mut e in agent.journal.all().into_iter().filter(|e| e.role == "source" && e.state == "committing") {
        let agent = agent.clone();
        tokio::spawn(async move {
            let peer = match e.peer_addr.parse::<std::net::SocketAddr>() {
                Ok(a) => Some((a, e.peer.clone())),
                Err(_) => agent.cfg.resolve_peer(&e.peer).ok(),
            };
            let Some((addr, name)) = peer else {
                tracing::error!(id = %e.id, peer = %e.peer, "in-doubt migration to an unknown peer; resolve by hand (see docs/operations.md)");
                return;
            };
            tracing::warn!(id = %e.id, pid = e.pid, peer = %name, "resolving a migration left in doubt by the previous run");
            loop {
                // The tree's processes, if the root is still the one that was parked.
                let same = journal::start_time(e.host_pid) == Some(e.start_time);
                let signal_tree = |sig: i32| {
                    let pids = if e.tree_pids.is_empty() { vec![e.host_pid] } else { e.tree_pids.clone() };
                    for p in pids.iter().rev() {
                        let _ = floe_engine::sys::task::kill(*p, sig);
                    }
                };
                match query(&agent, addr, &name, &e.id).await {
                    Ok(o) if o == "released" => {
                        if same {
                            signal_tree(libc::SIGKILL);
                        }
                        record(&agent, &mut e, "committed");
                        return;
                    }
                    Ok(o) if o == "discarded" || o == "unknown" => {
                        if same {
                            signal_tree(libc::SIGCONT);
                        }
                        record(&agent, &mut e, "aborted");
                        return;
                    }
                    _ => tokio::time::sleep(Duration::from_secs(2)).await,
                }
            }
        });
    }
}

/// One in-doubt query on a fresh connection.
pub async fn query(agent: &Agent, addr: std::net::SocketAddr, name: &str, id: &str) -> Result<String, MigrateError> {
    let conn = connect(agent, addr, name).await?;
    let (mut send, mut recv) =
        conn.open_bi().await.map_err(|e| MigrateError::Connect { peer: name.into(), what: e.to_string() })?;
    let werr = |source| MigrateError::Wire { peer: name.into(), phase: "query".into(), source };
    wire::write_control(&mut send, &peer(Msg::Query(pp::Query { migration_id: id.into() }))).await.map_err(werr)?;
    let f: pp::Frame = tokio::time::timeout(Duration::from_secs(5), wire::read_control(&mut recv, 1 << 20))
        .await
        .map_err(|_| MigrateError::Timeout { phase: "query".into(), secs: 5 })?
        .map_err(|source| MigrateError::Wire { peer: name.into(), phase: "query".into(), source })?;
    match f.msg {
        Some(Msg::QueryReply(r)) => Ok(r.outcome),
        other => Err(MigrateError::Refused(format!(
            "unexpected answer to a query: {:?}",
            other.map(peer_frame).map(|f| wire::frame_name(&f))
        ))),
    }
}
