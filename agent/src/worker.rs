//! Threads that own the engine objects of a migration. ptrace ties a traced
//! process to the thread that attached it, so every engine call of one
//! migration's side runs on one dedicated thread, driven by commands.
use crate::batch::Decoded;
use floe_engine::dump::ChunkConsumer;
use floe_engine::migrate::{Finished, PassReport, Source, SourceOptions, Staged};
use floe_engine::restore::{PageWriter, RestoreOptions};
use floe_proto::image as pb;
use std::collections::HashMap;
use std::path::PathBuf;
use tokio::sync::oneshot;

/// An error and its causes, as one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The final pass's output.
pub struct FinalOut {
    pub report: floe_engine::dump::DumpReport,
}

enum SrcCmd {
    Pass(ChunkConsumer, oneshot::Sender<Result<PassReport, String>>),
    Final(PathBuf, Option<floe_netfilter::Lock>, ChunkConsumer, oneshot::Sender<Result<FinalOut, String>>),
    Kill(oneshot::Sender<Result<(), String>>),
    Resume(oneshot::Sender<Result<(), String>>),
    Park(oneshot::Sender<Result<(), String>>),
}

/// The source tree's engine thread. Dropping it resumes a frozen tree and
/// stops dirty tracking.
pub struct SourceWorker {
    tx: Option<std::sync::mpsc::Sender<SrcCmd>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub tracker: String,
}

fn gone<T>() -> Result<T, String> {
    Err("the migration's engine thread stopped".into())
}

impl SourceWorker {
    pub fn start(opts: SourceOptions) -> Result<Self, String> {
        let (tx, rx) = std::sync::mpsc::channel::<SrcCmd>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<String, String>>();
        let thread = std::thread::Builder::new()
            .name(format!("floe-src-{}", opts.pid))
            .spawn(move || {
                let mut src = match Source::new(&opts) {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(s.tracker().to_string()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(chain(&e)));
                        return;
                    }
                };
                for cmd in rx {
                    match cmd {
                        SrcCmd::Pass(c, r) => {
                            let _ = r.send(src.pass(c).map(|(_, rep)| rep).map_err(|e| chain(&e)));
                        }
                        SrcCmd::Final(dir, lock, pages, r) => {
                            let res = src.freeze_final(&dir, lock, Some(pages)).map(|report| FinalOut { report });
                            let _ = r.send(res.map_err(|e| chain(&e)));
                        }
                        SrcCmd::Kill(r) => {
                            let _ = r.send(src.kill().map_err(|e| chain(&e)));
                        }
                        SrcCmd::Resume(r) => {
                            let _ = r.send(src.resume().map_err(|e| chain(&e)));
                        }
                        SrcCmd::Park(r) => {
                            let _ = r.send(src.park().map_err(|e| chain(&e)));
                        }
                    }
                }
                // Channel closed: `src` drops here, on its own thread.
            })
            .map_err(|e| format!("cannot start the engine thread: {e}"))?;
        let tracker = ready_rx.recv().unwrap_or_else(|_| Err("engine thread died".into()))?;
        Ok(Self { tx: Some(tx), thread: Some(thread), tracker })
    }

    fn send<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> SrcCmd,
    ) -> oneshot::Receiver<Result<T, String>> {
        let (rtx, rrx) = oneshot::channel();
        if let Some(tx) = &self.tx {
            let _ = tx.send(make(rtx));
        }
        rrx
    }

    pub async fn pass(&self, c: ChunkConsumer) -> Result<PassReport, String> {
        self.send(|r| SrcCmd::Pass(c, r)).await.unwrap_or_else(|_| gone())
    }

    /// The final freeze: pages go to `pages` as the tree's state is
    /// written to `dir`.
    pub async fn freeze_final(
        &self,
        dir: PathBuf,
        lock: Option<floe_netfilter::Lock>,
        pages: ChunkConsumer,
    ) -> Result<FinalOut, String> {
        self.send(|r| SrcCmd::Final(dir, lock, pages, r)).await.unwrap_or_else(|_| gone())
    }

    pub async fn kill(&self) -> Result<(), String> {
        self.send(SrcCmd::Kill).await.unwrap_or_else(|_| gone())
    }

    pub async fn resume(&self) -> Result<(), String> {
        self.send(SrcCmd::Resume).await.unwrap_or_else(|_| gone())
    }

    /// Queues a SIGSTOP so the frozen tree stays stopped even if this agent dies.
    pub async fn park(&self) -> Result<(), String> {
        self.send(SrcCmd::Park).await.unwrap_or_else(|_| gone())
    }
}

impl Drop for SourceWorker {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Commands for the target's engine thread, in stream order.
pub enum TgtCmd {
    /// Answers with a writer other threads may use during the first pass.
    /// Pass 0's state, with the contents of the deleted files it maps or
    /// runs by (dev, inode).
    Create(
        Box<pb::Manifest>,
        RestoreOptions,
        HashMap<(u64, u64), Vec<u8>>,
        oneshot::Sender<Result<Option<PageWriter>, String>>,
    ),
    /// Where to give frame buffers back once their pages are written.
    Pool(std::sync::mpsc::Sender<Vec<u8>>),
    Layout(Box<pb::Process>),
    Write(Decoded),
    /// Pages another thread wrote with the first pass's [`PageWriter`]:
    /// (pid, ranges, bytes copied, bytes written), and the frame buffer.
    Written(i32, Vec<(u64, u64)>, u64, u64, Vec<u8>),
    /// A batch that failed its checks: the migration fails at the next sync.
    Fail(String),
    Sync(oneshot::Sender<Result<u64, String>>),
    /// Answers (the root's pid, its host pid).
    Finish(PathBuf, HashMap<i32, Vec<(u64, u64)>>, oneshot::Sender<Result<(i32, i32), String>>),
    Release(oneshot::Sender<Result<(i32, i32), String>>),
}

/// The target tree's engine thread. Dropping it kills an unreleased tree.
pub struct TargetWorker {
    pub tx: Option<std::sync::mpsc::SyncSender<TgtCmd>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TargetWorker {
    pub fn start(name: String) -> Result<Self, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<TgtCmd>(4);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let mut staged: Option<Staged> = None;
                let mut finished: Option<Finished> = None;
                let mut failed: Option<String> = None;
                let mut pool: Option<std::sync::mpsc::Sender<Vec<u8>>> = None;
                for cmd in rx {
                    match cmd {
                        TgtCmd::Pool(p) => pool = Some(p),
                        TgtCmd::Create(m, opts, deleted, r) => {
                            let t = std::time::Instant::now();
                            let res = Staged::create(&m, &opts, &deleted).map_err(|e| chain(&e));
                            if res.is_ok() {
                                let ms = t.elapsed().as_secs_f64() * 1000.0;
                                tracing::info!(pid = m.root_pid, create_ms = ms, "staged tree created");
                            }
                            let _ = r.send(res.map(|s| {
                                let writer = s.page_writer();
                                staged = Some(s);
                                writer
                            }));
                        }
                        TgtCmd::Layout(p) => {
                            if failed.is_none() {
                                if let Some(s) = staged.as_mut() {
                                    if let Err(e) = s.relayout(std::slice::from_ref(&p)) {
                                        failed = Some(chain(&e));
                                    }
                                }
                            }
                        }
                        TgtCmd::Write(d) => {
                            if failed.is_some() {
                                continue;
                            }
                            let Some(s) = staged.as_mut() else {
                                failed = Some("pages arrived before the process state".into());
                                continue;
                            };
                            let r = s
                                .write(d.pid, &d.buf[d.at.clone()], &d.ranges)
                                .and_then(|()| s.write_zero(d.pid, &d.zero));
                            if let Err(e) = r {
                                failed = Some(chain(&e));
                            }
                            if let Some(pool) = &pool {
                                let _ = pool.send(d.buf);
                            }
                        }
                        TgtCmd::Written(pid, ranges, copied, written, buf) => {
                            if let Some(s) = staged.as_mut() {
                                s.record_written(pid, &ranges, copied, written);
                            }
                            if let Some(pool) = &pool {
                                let _ = pool.send(buf);
                            }
                        }
                        TgtCmd::Fail(m) => {
                            failed.get_or_insert(m);
                        }
                        TgtCmd::Sync(r) => {
                            if let Some(s) = staged.as_mut() {
                                s.first_pass_done();
                            }
                            let res = match (&failed, &staged) {
                                (Some(m), _) => Err(m.clone()),
                                (None, Some(s)) => Ok(s.pages_written),
                                (None, None) => Err("no process state received".into()),
                            };
                            let _ = r.send(res);
                        }
                        TgtCmd::Finish(dir, present, r) => {
                            let res = match (failed.clone(), staged.take()) {
                                (Some(m), _) => Err(m),
                                (None, None) => Err("no process state received".into()),
                                // receive_final checked pages.img against the source's blake3.
                                (None, Some(s)) => s.finish(&dir, &present, true).map_err(|e| chain(&e)),
                            };
                            let _ = r.send(res.map(|f| {
                                let pids = (f.root_pid(), f.host_pid());
                                finished = Some(f);
                                pids
                            }));
                        }
                        TgtCmd::Release(r) => {
                            let res = match finished.take() {
                                Some(f) => f.release().map_err(|e| chain(&e)),
                                None => Err("nothing to release".into()),
                            };
                            let _ = r.send(res);
                        }
                    }
                }
                // Dropped here (on this thread): an unreleased tree is killed.
                drop(finished);
                drop(staged);
            })
            .map_err(|e| format!("cannot start the engine thread: {e}"))?;
        Ok(Self { tx: Some(tx), thread: Some(thread) })
    }

    /// Sends a command (blocks while the engine thread is behind).
    pub fn send_blocking(&self, cmd: TgtCmd) -> Result<(), String> {
        match &self.tx {
            Some(tx) => tx.send(cmd).map_err(|_| "the migration's engine thread stopped".to_string()),
            None => gone(),
        }
    }
}

impl Drop for TargetWorker {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
