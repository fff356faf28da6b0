//! The target side of a migration: checks, staged restore as pages arrive,
//! the final image, and the release on commit.
use crate::batch;
use crate::journal::{self, Entry};
use crate::state::{Agent, InFlight};
use crate::wire::{self, peer, WireError};
use crate::worker::{chain, TargetWorker, TgtCmd};
use floe_engine::restore::PageWriter;
use floe_proto::frame;
use floe_proto::peer::{self as pp, frame::Msg};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::oneshot;

/// Serves one incoming connection (one migration, or in-doubt queries).
pub async fn serve(agent: Arc<Agent>, conn: quinn::Connection) {
    let peer_name = crate::tls::peer_name(&conn).unwrap_or_default();
    if peer_name.is_empty() || !agent.cfg.peer_allowed(&peer_name) {
        tracing::warn!(peer = %peer_name, remote = %conn.remote_address(), "peer not in allowed_peers; connection refused");
        conn.close(1u32.into(), b"peer not allowed");
        return;
    }
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(peer = %peer_name, error = %e, "connection ended");
                return;
            }
        };
        let agent = agent.clone();
        let peer_name = peer_name.clone();
        tokio::spawn(async move {
            if let Err(e) = stream(agent, peer_name.clone(), send, recv).await {
                tracing::warn!(peer = %peer_name, error = %chain(&e), "migration from peer failed");
            }
        });
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("connection to the source failed")]
    Wire(#[from] WireError),
    #[error("{0}")]
    Failed(String),
}

struct Stream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    max: u32,
}

impl Stream {
    async fn send(&mut self, m: Msg) -> Result<(), WireError> {
        wire::write_control(&mut self.send, &peer(m)).await
    }
}

async fn stream(
    agent: Arc<Agent>,
    peer_name: String,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<(), TargetError> {
    // A pages frame holds up to max_frame_bytes of data plus its description.
    let max = agent.cfg.limits.max_frame_bytes.saturating_add(frame::MAX_BATCH_HEADER);
    let mut st = Stream { send, recv, max };
    let first: pp::Frame = wire::read_control(&mut st.recv, max).await?;
    let hello = match first.msg {
        Some(Msg::Query(q)) => {
            let outcome = outcome_of(&agent, &q.migration_id);
            st.send(Msg::QueryReply(pp::QueryReply { migration_id: q.migration_id, outcome })).await?;
            let _ = st.send.finish();
            return Ok(());
        }
        Some(Msg::Hello(h)) => h,
        other => {
            let got = wire::frame_name(&pp::Frame { msg: other });
            return Err(TargetError::Wire(WireError::Unexpected { expected: "hello", got }));
        }
    };
    let reply = |error: String| {
        Msg::HelloReply(pp::HelloReply {
            protocol_version: frame::PROTOCOL_VERSION,
            floe_version: env!("CARGO_PKG_VERSION").into(),
            target: agent.cfg.name.clone(),
            error,
            max_frame: agent.cfg.limits.max_frame_bytes,
        })
    };
    if hello.protocol_version != frame::PROTOCOL_VERSION {
        let why = format!(
            "peer protocol version {} is not supported: this agent speaks version {}",
            hello.protocol_version,
            frame::PROTOCOL_VERSION
        );
        tracing::warn!(peer = %peer_name, "{why}");
        st.send(reply(why.clone())).await?;
        let _ = st.send.finish();
        return Err(TargetError::Failed(why));
    }
    if !journal::valid_id(&hello.migration_id) || agent.journal.get(&hello.migration_id).is_some() {
        let why = format!("migration id {:?} is malformed or already used", hello.migration_id);
        st.send(reply(why.clone())).await?;
        return Err(TargetError::Failed(why));
    }
    if hello.source != peer_name {
        tracing::warn!(claimed = %hello.source, certificate = %peer_name, "source names itself differently from its certificate");
    }
    let busy = agent.list().len() >= agent.cfg.limits.max_concurrent_migrations;
    if busy {
        let why = format!("{} migrations already in flight (limits.max_concurrent_migrations)", agent.list().len());
        st.send(reply(why.clone())).await?;
        return Err(TargetError::Failed(why));
    }
    st.send(reply(String::new())).await?;
    let id = hello.migration_id.clone();
    agent.begin(InFlight::new(&id, "target", 0, &peer_name, "preflight"));
    let mut entry = Entry {
        id: id.clone(),
        role: "target".into(),
        pid: 0,
        host_pid: 0,
        start_time: 0,
        peer: peer_name.clone(),
        peer_addr: String::new(),
        tree_pids: Vec::new(),
        state: "receiving".into(),
        updated_unix_ms: 0,
    };
    record(&agent, &mut entry, "receiving");
    let r = receive(&agent, &mut st, &id, &mut entry).await;
    agent.end(&id);
    if let Err(e) = &r {
        if entry.state != "released" {
            record(&agent, &mut entry, "discarded");
            let reason = format!("{}: {}", agent.cfg.name, chain(e));
            let _ = st.send(Msg::Abort(pp::Abort { reason })).await;
            let _ = st.send.finish();
            // The source may be blocked writing pages: make its writes fail now.
            let _ = st.recv.stop(0u32.into());
        }
    }
    r
}

fn record(agent: &Agent, e: &mut Entry, state: &str) {
    e.state = state.to_string();
    if let Err(err) = agent.journal.record(e) {
        tracing::error!(id = %e.id, state, error = %err, "cannot write the migration journal");
    }
}

/// What this agent did with migration `id`, for a source in doubt.
fn outcome_of(agent: &Agent, id: &str) -> String {
    let Some(e) = agent.journal.get(id) else { return "unknown".into() };
    if e.role != "target" {
        return "unknown".into();
    }
    match e.state.as_str() {
        "released" => "released".into(),
        // Crashed between the two journal writes: the tree ran only if detached (it is alive).
        "releasing" => {
            if journal::start_time(e.host_pid) == Some(e.start_time) {
                "released".into()
            } else {
                "discarded".into()
            }
        }
        "receiving" | "ready" if agent.list().iter().any(|m| m.id == id) => "receiving".into(),
        _ => "discarded".into(),
    }
}

fn failed(e: impl std::fmt::Display) -> TargetError {
    TargetError::Failed(e.to_string())
}

async fn receive(agent: &Arc<Agent>, st: &mut Stream, id: &str, entry: &mut Entry) -> Result<(), TargetError> {
    // Pre-flight (nothing is stopped on the source yet).
    let f: pp::Frame = wire::read_control(&mut st.recv, st.max).await?;
    let facts = match f.msg {
        Some(Msg::Preflight(p)) => p,
        other => {
            let got = wire::frame_name(&pp::Frame { msg: other });
            return Err(WireError::Unexpected { expected: "preflight", got }.into());
        }
    };
    let new_pidns = facts.new_pidns;
    let facts2 = facts.clone();
    let problems =
        tokio::task::spawn_blocking(move || floe_engine::migrate::preflight::check(&facts2)).await.map_err(failed)?;
    let mut problems = problems;
    let limit = agent.cfg.limits.max_memory_bytes;
    if limit > 0 && facts.memory_bytes > limit {
        problems.push(format!(
            "the tree uses {} MiB, above this agent's limits.max_memory_bytes ({} MiB)",
            facts.memory_bytes >> 20,
            limit >> 20
        ));
    }
    let ok = problems.is_empty();
    st.send(Msg::PreflightReply(pp::PreflightReply { problems: problems.clone() })).await?;
    if !ok {
        tracing::info!(id, problems = ?problems, "pre-flight refused the migration");
        record(agent, entry, "discarded");
        return Ok(());
    }
    entry.pid = facts.root_pid;
    let worker = TargetWorker::start(format!("floe-tgt-{}", facts.root_pid)).map_err(failed)?;
    // Frames are checked (decompression, page checksums) on a thread of their own, in order.
    let (vtx, vrx) = std::sync::mpsc::sync_channel::<Verify>(8);
    let wtx = worker.tx.clone().ok_or_else(|| failed("engine thread gone"))?;
    let max_raw = st.max as u64 * 64;
    let verifier = std::thread::Builder::new()
        .name("floe-verify".into())
        .spawn(move || verify_loop(vrx, wtx, max_raw))
        .map_err(failed)?;
    let r = apply_stream(agent, st, id, entry, &worker, &vtx, new_pidns).await;
    drop(vtx);
    let _ = verifier.join();
    // On error the worker drops here and kills the stopped tree.
    r.map(|_| ())
}

enum Verify {
    /// A pages frame's payload (in a buffer that may be longer).
    Pages(Vec<u8>, usize),
    Cmd(TgtCmd),
    /// The first pass's writer (see [`floe_engine::restore::PageWriter`]):
    /// from now until the next command, batches are checked and written by
    /// [`APPLIERS`] threads side by side.
    Writer(Option<PageWriter>),
}

/// Threads that check and write the first pass's batches side by side. A
/// fresh page's first write can be slow (a virtual machine's host may have
/// to fault it in), so one writer could hold the whole pass back.
const APPLIERS: usize = 2;

/// Checks frames in order and hands them to the engine thread; during the
/// first pass, checks and writes them on [`APPLIERS`] threads instead, and
/// holds every command until the batches before it are written.
fn verify_loop(rx: std::sync::mpsc::Receiver<Verify>, tx: std::sync::mpsc::SyncSender<TgtCmd>, max_raw: u64) {
    let (done_tx, done_rx) = std::sync::mpsc::channel::<TgtCmd>();
    let mut appliers = Vec::new();
    for i in 0..APPLIERS {
        let (jtx, jrx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize, PageWriter)>(2);
        let done = done_tx.clone();
        let spawned = std::thread::Builder::new().name(format!("floe-apply-{i}")).spawn(move || {
            for (payload, len, writer) in jrx {
                if done.send(apply_pages(payload, len, max_raw, &writer)).is_err() {
                    return;
                }
            }
        });
        match spawned {
            Ok(h) => appliers.push((jtx, h)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a page applier thread; batches are written one at a time")
            }
        }
    }
    drop(done_tx);
    let senders: Vec<_> = appliers.iter().map(|(jtx, _)| jtx.clone()).collect();
    dispatch(rx, &tx, max_raw, &senders, &done_rx);
    // The appliers finish what they hold (their results go nowhere) and stop.
    drop(senders);
    for (jtx, h) in appliers {
        drop(jtx);
        let _ = h.join();
    }
}

/// [`verify_loop`]'s work: returns when `rx` closes or the engine thread is gone.
fn dispatch(
    rx: std::sync::mpsc::Receiver<Verify>,
    tx: &std::sync::mpsc::SyncSender<TgtCmd>,
    max_raw: u64,
    appliers: &[std::sync::mpsc::SyncSender<(Vec<u8>, usize, PageWriter)>],
    done_rx: &std::sync::mpsc::Receiver<TgtCmd>,
) {
    let mut writer: Option<PageWriter> = None;
    let (mut outstanding, mut next) = (0usize, 0usize);
    let forward = |cmd: TgtCmd| tx.send(cmd).is_ok();
    for v in rx {
        // Results of the appliers, in any order (the pages of one pass are disjoint).
        while let Ok(r) = done_rx.try_recv() {
            outstanding -= 1;
            if !forward(r) {
                return;
            }
        }
        let cmd = match v {
            Verify::Writer(w) => {
                writer = w.filter(|_| !appliers.is_empty());
                continue;
            }
            Verify::Pages(payload, len) => match &writer {
                Some(w) => {
                    let job = (payload, len, w.clone());
                    if appliers[next % appliers.len()].send(job).is_err() {
                        let _ = forward(TgtCmd::Fail("a page applier thread stopped".into()));
                        return;
                    }
                    next += 1;
                    outstanding += 1;
                    continue;
                }
                None => decode_pages(payload, len, max_raw),
            },
            Verify::Cmd(c) => {
                // Every batch before a command is written before it runs.
                while outstanding > 0 {
                    let Ok(r) = done_rx.recv() else { break };
                    outstanding -= 1;
                    if !forward(r) {
                        return;
                    }
                }
                // Any command ends the first pass's side-by-side writing
                // (its end is a sync; a layout or the final state follow it).
                if !matches!(c, TgtCmd::Pool(_)) {
                    writer = None;
                }
                c
            }
        };
        if !forward(cmd) {
            return;
        }
    }
}

/// An applier's job: checks a pages frame, then writes it with `writer`.
fn apply_pages(payload: Vec<u8>, len: usize, max_raw: u64, writer: &PageWriter) -> TgtCmd {
    let d = match decode_pages(payload, len, max_raw) {
        TgtCmd::Write(d) => d,
        other => return other,
    };
    let written = writer
        .write(d.pid, &d.buf[d.at.clone()], &d.ranges)
        .and_then(|(c, w)| writer.write_zero(d.pid, &d.zero).map(|(c2, w2)| (c + c2, w + w2)));
    match written {
        Ok((copied, bytes)) => {
            let mut ranges = d.ranges;
            ranges.extend_from_slice(&d.zero);
            TgtCmd::Written(d.pid, ranges, copied, bytes, d.buf)
        }
        Err(e) => TgtCmd::Fail(chain(&e)),
    }
}

/// A pages frame's payload (the first `len` bytes of `payload`) as an engine command.
fn decode_pages(mut payload: Vec<u8>, len: usize, max_raw: u64) -> TgtCmd {
    let (b, at) = match frame::split_pages(&payload[..len]) {
        Ok((b, data)) => (b, len - data.len()),
        Err(e) => return TgtCmd::Fail(format!("malformed page batch: {e}")),
    };
    payload.truncate(len);
    match batch::decode(&b, payload, at, max_raw) {
        Ok(d) => TgtCmd::Write(d),
        Err(e) => {
            tracing::error!(error = %e, "page batch refused");
            TgtCmd::Fail(e.to_string())
        }
    }
}

async fn to_verifier(vtx: &std::sync::mpsc::SyncSender<Verify>, v: Verify) -> Result<(), TargetError> {
    // The channel is bounded: this waits while the engine thread is behind.
    let vtx = vtx.clone();
    tokio::task::spawn_blocking(move || vtx.send(v)).await.map_err(failed)?.map_err(|_| failed("engine thread stopped"))
}

async fn sync(vtx: &std::sync::mpsc::SyncSender<Verify>) -> Result<u64, TargetError> {
    let (tx, rx) = oneshot::channel();
    to_verifier(vtx, Verify::Cmd(TgtCmd::Sync(tx))).await?;
    rx.await.map_err(|_| failed("engine thread stopped"))?.map_err(TargetError::Failed)
}

/// Network changes made for a migration on this host; undone if it fails.
#[derive(Default)]
struct NetState {
    /// Service addresses added (address, interface).
    added: Vec<(String, String)>,
    lock: Option<floe_netfilter::Lock>,
    /// What the lock drops on the way in, for the restored connections.
    capture: Option<floe_netfilter::Capture>,
    /// The configured address hook, if any.
    hook: Option<std::path::PathBuf>,
}

impl Drop for NetState {
    fn drop(&mut self) {
        for (cidr, dev) in &self.added {
            if let Err(e) = crate::netaddr::undo_add(cidr, dev, self.hook.as_deref()) {
                tracing::error!(address = %cidr, error = %chain(&e), "cannot remove the service address after a failed migration");
            }
        }
        // The lock's own drop deletes its table.
    }
}

#[allow(clippy::too_many_arguments)]
async fn apply_stream(
    agent: &Arc<Agent>,
    st: &mut Stream,
    id: &str,
    entry: &mut Entry,
    worker: &TargetWorker,
    vtx: &std::sync::mpsc::SyncSender<Verify>,
    new_pidns: bool,
) -> Result<i32, TargetError> {
    let mut net = NetState { added: Vec::new(), lock: None, capture: None, hook: agent.cfg.address_hook.clone() };
    let mut pass_t = Instant::now();
    // Frame buffers come back from the engine thread once written: no fresh
    // 16 MiB allocation (and its page faults) per batch.
    let (pool_tx, pool_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    to_verifier(vtx, Verify::Cmd(TgtCmd::Pool(pool_tx))).await?;
    // Deleted files the tree maps or runs, sent before the first pass.
    let mut deleted: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    loop {
        let mut buf = pool_rx.try_recv().unwrap_or_default();
        let (kind, len) = wire::read_frame_into(&mut st.recv, st.max, &mut buf).await?;
        if kind == frame::KIND_PAGES {
            to_verifier(vtx, Verify::Pages(buf, len)).await?;
            continue;
        }
        let f: pp::Frame = frame::decode(&buf[..len]).map_err(WireError::Frame)?;
        match f.msg {
            Some(Msg::PassStart(p)) => {
                let m = p.manifest.ok_or_else(|| failed("pass start without the process state"))?;
                agent.set_phase(id, "precopy", p.pass, 0);
                // Connections come back silent (repair mode) and go live on commit.
                let opts = floe_engine::restore::RestoreOptions {
                    new_pidns,
                    tcp_established: true,
                    tcp_hold: true,
                    ..Default::default()
                };
                let (tx, rx) = oneshot::channel();
                let files = std::mem::take(&mut deleted);
                to_verifier(vtx, Verify::Cmd(TgtCmd::Create(Box::new(m), opts, files, tx))).await?;
                let writer = rx.await.map_err(|_| failed("engine thread stopped"))?.map_err(TargetError::Failed)?;
                // Before any page of the pass: nothing else is read meanwhile.
                to_verifier(vtx, Verify::Writer(writer)).await?;
                pass_t = Instant::now();
            }
            Some(Msg::DeletedFile(d)) => {
                let data = receive_deleted(st, &d, deleted.values().map(|v| v.len() as u64).sum()).await?;
                deleted.insert((d.dev, d.ino), data);
            }
            Some(Msg::Layout(l)) => {
                if l.pass == 1 {
                    agent.hooks.maybe_exit("precopy");
                }
                let p = l.process.ok_or_else(|| failed("layout without a process"))?;
                to_verifier(vtx, Verify::Cmd(TgtCmd::Layout(Box::new(p)))).await?;
            }
            Some(Msg::PassEnd(e)) => {
                let written = sync(vtx).await?;
                agent.set_phase(id, "precopy", e.pass, written * 4096);
                st.send(Msg::PassAck(pp::PassAck {
                    pass: e.pass,
                    pages_written: written,
                    apply_ms: pass_t.elapsed().as_secs_f64() * 1000.0,
                }))
                .await?;
                pass_t = Instant::now();
            }
            Some(Msg::FinalImage(fi)) => {
                agent.hooks.maybe_exit("final");
                agent.set_phase(id, "final", 0, 0);
                let t = Instant::now();
                let mut ready = pp::Ready::default();
                let dir = receive_final(agent, st, id, &fi).await?;
                ready.receive_ms = ms(t.elapsed());
                let tl = Instant::now();
                // The connections' lock first, before they are restored here.
                let d2 = dir.clone();
                let conns = tokio::task::spawn_blocking(move || {
                    floe_engine::image::ImageReader::open(&d2)
                        .map(|img| floe_engine::migrate::image_connections(&img.manifest))
                })
                .await
                .map_err(failed)?
                .map_err(|e| failed(format!("the final image is unreadable: {e}")))?;
                if !conns.is_empty() {
                    let name = format!("floe_mig_{}", &id[..16]);
                    let (lock, cap) = floe_netfilter::Lock::prepare_capturing(&name, floe_engine::dump::NET_LOCK_MARK)
                        .map_err(|e| failed(chain(&e)))?;
                    lock.lock(&conns).map_err(|e| failed(chain(&e)))?;
                    net.lock = Some(lock);
                    net.capture = cap;
                }
                ready.lock_ms = ms(tl.elapsed());
                let ta = Instant::now();
                // Then the service addresses: a peer's packet that reached
                // them before the lock would be answered with a reset.
                for cidr in &fi.addresses {
                    let c = cidr.clone();
                    let hook = agent.cfg.address_hook.clone();
                    let dev = tokio::task::spawn_blocking(move || crate::netaddr::add(&c, None, hook.as_deref()))
                        .await
                        .map_err(failed)?
                        .map_err(|e| failed(format!("cannot add the service address here: {e}")))?;
                    net.added.push((cidr.clone(), dev));
                }
                ready.address_ms = ms(ta.elapsed());
                let tf = Instant::now();
                let present: HashMap<i32, Vec<(u64, u64)>> = fi
                    .present
                    .iter()
                    .map(|p| (p.pid, p.ranges.chunks_exact(2).map(|c| (c[0], c[1])).collect()))
                    .collect();
                let (tx, rx) = oneshot::channel();
                to_verifier(vtx, Verify::Cmd(TgtCmd::Finish(dir.clone(), present, tx))).await?;
                let res = rx.await.map_err(|_| failed("engine thread stopped"));
                let _ = std::fs::remove_dir_all(&dir);
                let (root, host_pid) = res?.map_err(TargetError::Failed)?;
                ready.finish_ms = ms(tf.elapsed());
                agent.hooks.maybe_exit("ready");
                // Known before release, so an answer about "releasing" can check liveness.
                entry.host_pid = host_pid;
                entry.start_time = journal::start_time(host_pid).unwrap_or(0);
                record(agent, entry, "ready");
                ready.pid = root;
                ready.restore_ms = ms(t.elapsed());
                tracing::info!(
                    id,
                    receive_ms = ready.receive_ms,
                    lock_ms = ready.lock_ms,
                    address_ms = ready.address_ms,
                    finish_ms = ready.finish_ms,
                    "restored; ready"
                );
                st.send(Msg::Ready(ready)).await?;
                // Nothing runs until the source commits; a lost connection or an abort discards the tree.
                let f: pp::Frame = wire::read_control(&mut st.recv, st.max).await?;
                let mut received = match f.msg {
                    Some(Msg::Commit(c)) => crate::received::from_wire(c.received),
                    Some(Msg::Abort(a)) => return Err(failed(format!("the source aborted: {}", a.reason))),
                    other => {
                        let got = wire::frame_name(&pp::Frame { msg: other });
                        return Err(WireError::Unexpected { expected: "commit", got }.into());
                    }
                };
                record(agent, entry, "releasing");
                agent.hooks.maybe_exit("releasing");
                let mut done = pp::Done::default();
                let tu = Instant::now();
                // The source copy never runs again: let the connections' packets through here.
                if let Some(l) = net.lock.take() {
                    match l.unlock_deferred() {
                        // Closing the netlink socket is slow: not in the downtime.
                        Ok((_, sock)) => crate::state::drop_elsewhere(sock),
                        Err(e) => tracing::error!(error = %e, "cannot remove the network lock"),
                    }
                }
                net.added.clear();
                done.unlock_ms = ms(tu.elapsed());
                let tr = Instant::now();
                let (tx, rx) = oneshot::channel();
                worker.send_blocking(TgtCmd::Release(tx)).map_err(failed)?;
                let (host_pid, wait_pid) =
                    rx.await.map_err(|_| failed("engine thread stopped"))?.map_err(TargetError::Failed)?;
                done.release_ms = ms(tr.elapsed());
                let ti = Instant::now();
                // The connections run here now: what the peers sent while
                // they were locked (on the source, then here; all copied
                // by the time the lock was deleted) arrives as if just sent.
                if let Some(mut cap) = net.capture.take() {
                    received.extend(cap.drain());
                    // Closing a netlink socket can take the kernel ~10 ms.
                    crate::state::drop_elsewhere(cap);
                }
                if !received.is_empty() {
                    match floe_netfilter::reinject(&received, floe_engine::dump::NET_LOCK_MARK) {
                        Ok(n) => {
                            done.reinjected = n as u32;
                            tracing::info!(id, segments = n, "segments dropped during the freeze delivered")
                        }
                        Err(e) => {
                            tracing::warn!(id, error = %chain(&e), "cannot deliver the segments dropped during the freeze; the peers will retransmit them")
                        }
                    }
                }
                entry.host_pid = host_pid;
                record(agent, entry, "released");
                agent.hooks.maybe_exit("released");
                reap(wait_pid);
                tracing::info!(id, pid = root, host_pid, "migrated process runs here");
                done.reinject_ms = ms(ti.elapsed());
                done.pid = root;
                tracing::info!(
                    id,
                    unlock_ms = done.unlock_ms,
                    release_ms = done.release_ms,
                    reinject_ms = done.reinject_ms,
                    "released"
                );
                st.send(Msg::Done(done)).await?;
                let _ = st.send.finish();
                return Ok(root);
            }
            Some(Msg::Abort(a)) => return Err(failed(format!("the source aborted: {}", a.reason))),
            other => {
                let got = wire::frame_name(&pp::Frame { msg: other });
                return Err(WireError::Unexpected { expected: "a pre-copy frame", got }.into());
            }
        }
    }
}

/// All deleted files of one migration together: at most this many bytes.
const MAX_DELETED_TOTAL: u64 = 4 << 30;

/// Receives the contents of the deleted file `d` (FileChunks with file 2)
/// and checks them; `before` bytes of other deleted files came already.
async fn receive_deleted(st: &mut Stream, d: &pp::DeletedFile, before: u64) -> Result<Vec<u8>, TargetError> {
    let max = floe_engine::dump::MAX_DELETED_FILE;
    if d.size > max || before + d.size > MAX_DELETED_TOTAL {
        return Err(failed(format!(
            "deleted file {} of {} bytes is too large (at most {} MiB each, {} MiB in all)",
            d.path,
            d.size,
            max >> 20,
            MAX_DELETED_TOTAL >> 20
        )));
    }
    let mut data = Vec::with_capacity(d.size as usize);
    while (data.len() as u64) < d.size {
        let f: pp::Frame = wire::read_control(&mut st.recv, st.max).await?;
        match f.msg {
            Some(Msg::FileChunk(c)) if c.file == 2 && !c.zstd => {
                if c.offset != data.len() as u64 || data.len() as u64 + c.data.len() as u64 > d.size {
                    return Err(failed(format!("deleted file {}: chunk out of order or too long", d.path)));
                }
                data.extend_from_slice(&c.data);
            }
            Some(Msg::Abort(a)) => return Err(failed(format!("the source aborted: {}", a.reason))),
            other => {
                let got = wire::frame_name(&pp::Frame { msg: other });
                return Err(WireError::Unexpected { expected: "a chunk of a deleted file", got }.into());
            }
        }
    }
    if blake3::hash(&data).as_bytes()[..] != d.blake3[..] {
        return Err(failed(format!("deleted file {} failed its checksum: corrupted in transit", d.path)));
    }
    Ok(data)
}

/// Receives the final image into a private directory.
async fn receive_final(
    agent: &Agent,
    st: &mut Stream,
    id: &str,
    fi: &pp::FinalImage,
) -> Result<std::path::PathBuf, TargetError> {
    let limit = st.max as u64 * 1024;
    if fi.manifest_len > limit || fi.pages_len > limit {
        return Err(failed(format!("final image of {} + {} bytes is too large", fi.manifest_len, fi.pages_len)));
    }
    let mut files = [Vec::with_capacity(fi.manifest_len as usize), Vec::with_capacity(fi.pages_len as usize)];
    let want = [fi.manifest_len, fi.pages_len];
    while files[0].len() as u64 != want[0] || files[1].len() as u64 != want[1] {
        let f: pp::Frame = wire::read_control(&mut st.recv, st.max).await?;
        match f.msg {
            Some(Msg::FileChunk(c)) => {
                let i = c.file as usize;
                if i > 1 || c.offset != files[i].len() as u64 {
                    return Err(failed("final image chunk out of order"));
                }
                let room = (want[i] - files[i].len() as u64) as usize;
                let data = if c.zstd {
                    // Never more than the file still lacks.
                    zstd::bulk::decompress(&c.data, room)
                        .map_err(|e| failed(format!("final image chunk does not decompress: {e}")))?
                } else {
                    c.data
                };
                if data.len() > room {
                    return Err(failed("final image chunk too long"));
                }
                files[i].extend_from_slice(&data);
            }
            Some(Msg::Abort(a)) => return Err(failed(format!("the source aborted: {}", a.reason))),
            other => {
                let got = wire::frame_name(&pp::Frame { msg: other });
                return Err(WireError::Unexpected { expected: "file chunk", got }.into());
            }
        }
    }
    if blake3::hash(&files[0]).as_bytes()[..] != fi.manifest_blake3[..]
        || blake3::hash(&files[1]).as_bytes()[..] != fi.pages_blake3[..]
    {
        return Err(failed("final image failed its checksum: corrupted in transit"));
    }
    let dir = agent.run_dir.join(format!("in-{id}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
    for (name, data) in [(floe_engine::image::MANIFEST_FILE, &files[0]), (floe_engine::image::PAGES_FILE, &files[1])] {
        std::fs::write(dir.join(name), data).map_err(|e| failed(format!("cannot write the final image: {e}")))?;
    }
    Ok(dir)
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Reaps a released tree's root when it exits (it is this agent's child).
fn reap(pid: i32) {
    let _ =
        std::thread::Builder::new().name(format!("floe-reap-{pid}")).spawn(
            move || match floe_engine::restore::wait_exit(pid) {
                Ok(code) => tracing::info!(pid, code, "migrated process exited"),
                Err(e) => tracing::debug!(pid, error = %e, "cannot wait for migrated process"),
            },
        );
}
