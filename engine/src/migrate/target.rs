//! The target side of a live migration: a restore built while the source runs.
use crate::image::{ImageChain, ImageReader};
use crate::restore::{load_pages, load_pages_preverified, Preflight, RestoreError, RestoreOptions, Tree};
use crate::sys::memory::Range;
use floe_proto::image as pb;
use std::collections::HashMap;

/// A stopped process tree being filled with pages as they arrive.
/// Dropping it kills every process in it.
pub struct Staged {
    tree: Tree,
    pre: Preflight,
    /// What each stub maps now, by pid (vmas only).
    layout: HashMap<i32, pb::Process>,
    /// Page ranges written into each process (unsorted, may overlap).
    written: HashMap<i32, Vec<(u64, u64)>>,
    /// Pids and thread ids at pass 0, in tree order.
    tasks: Vec<(i32, Vec<i32>)>,
    pub pages_written: u64,
    /// Bytes other threads wrote through [`Staged::page_writer`]: (copied, written).
    elsewhere: (u64, u64),
}

fn refused(what: String) -> RestoreError {
    RestoreError::Refused { what }
}

impl Staged {
    /// Checks the state of pass 0 against this host and builds the stopped
    /// tree with every mapping (restore stage a).
    pub fn create(
        m0: &pb::Manifest,
        opts: &RestoreOptions,
        deleted: &HashMap<(u64, u64), Vec<u8>>,
    ) -> Result<Self, RestoreError> {
        let pre = Preflight::check_manifest(m0, opts, deleted)?;
        let mut tree = Tree::create(m0, &pre)?;
        tree.park_installers(m0)?;
        // Pass 0 brings every page and the stubs have none yet.
        tree.start_filling(m0);
        let layout = m0
            .processes
            .iter()
            .filter(|p| !p.zombie)
            .map(|p| (p.pid, pb::Process { pid: p.pid, vmas: p.vmas.clone(), ..Default::default() }))
            .collect();
        let tasks = m0
            .processes
            .iter()
            .map(|p| (p.pid, if p.zombie { Vec::new() } else { p.threads.iter().map(|t| t.tid).collect() }))
            .collect();
        Ok(Self { tree, pre, layout, written: HashMap::new(), tasks, pages_written: 0, elsewhere: (0, 0) })
    }

    /// Writes `data` into process `pid` at `ranges` ((address, length), in
    /// order, consuming `data` front to back).
    pub fn write(&mut self, pid: i32, data: &[u8], ranges: &[(u64, u64)]) -> Result<(), RestoreError> {
        if !self.layout.contains_key(&pid) {
            return Err(refused(format!("page batch for process {pid}, which is not in this migration")));
        }
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        if total != data.len() as u64 || ranges.iter().any(|r| r.0 % 4096 != 0 || r.1 % 4096 != 0) {
            return Err(refused(format!("page batch for process {pid}: ranges do not match its data")));
        }
        let rs: Vec<Range> = ranges.iter().map(|&(addr, len)| Range { addr, len }).collect();
        // process_vm_writev takes a bounded number of ranges per call.
        let mut off = 0usize;
        for part in rs.chunks(crate::sys::memory::MAX_IOV) {
            let n: u64 = part.iter().map(|r| r.len).sum();
            self.tree.write_pages(pid, &data[off..off + n as usize], part)?;
            off += n as usize;
        }
        self.written.entry(pid).or_default().extend(ranges.iter().map(|&(a, l)| (a, a + l)));
        self.pages_written += total / 4096;
        Ok(())
    }

    /// Fills `ranges` of process `pid` with zeros.
    pub fn write_zero(&mut self, pid: i32, ranges: &[(u64, u64)]) -> Result<(), RestoreError> {
        const CHUNK: u64 = 1 << 20;
        // In .bss: never written, so it costs no memory.
        static ZEROS: [u8; CHUNK as usize] = [0; CHUNK as usize];
        let zeros = &ZEROS;
        for &(a, l) in ranges {
            let mut at = 0;
            while at < l {
                let n = (l - at).min(CHUNK);
                self.write(pid, &zeros[..n as usize], &[(a + at, n)])?;
                at += n;
            }
        }
        Ok(())
    }

    /// The first pass is over: from now on most pages written replace
    /// present ones, so they go through process_vm_writev again (and the
    /// stubs' userfaultfd registration is dropped).
    pub fn first_pass_done(&mut self) {
        let (copied, written) = self.tree.stop_filling();
        let (copied, written) = (copied + self.elsewhere.0, written + self.elsewhere.1);
        self.elsewhere = (0, 0);
        if copied + written > 0 {
            tracing::info!(
                copied_bytes = copied,
                written_bytes = written,
                "first pass written (UFFDIO_COPY, process_vm_writev)"
            );
        }
    }

    /// During the first pass: a writer other threads can use for its pages,
    /// which need no ptrace then (None once the pass is over, or without
    /// UFFDIO_COPY filling). What they write must be reported with
    /// [`Staged::record_written`] before the pass ends.
    pub fn page_writer(&self) -> Option<crate::restore::PageWriter> {
        self.tree.page_writer()
    }

    /// Pages of process `pid` at `ranges` that another thread wrote with
    /// [`Staged::page_writer`] (`copied` and `written` bytes: by UFFDIO_COPY
    /// and by process_vm_writev).
    pub fn record_written(&mut self, pid: i32, ranges: &[(u64, u64)], copied: u64, written: u64) {
        self.written.entry(pid).or_default().extend(ranges.iter().map(|&(a, l)| (a, a + l)));
        self.pages_written += ranges.iter().map(|r| r.1).sum::<u64>() / 4096;
        self.elsewhere.0 += copied;
        self.elsewhere.1 += written;
    }

    /// Brings the stubs' mappings up to date with a pass's (before its pages).
    pub fn relayout(&mut self, procs: &[pb::Process]) -> Result<(), RestoreError> {
        self.tree.stop_filling();
        for p in procs.iter().filter(|p| !p.zombie) {
            let old = self
                .layout
                .get(&p.pid)
                .ok_or_else(|| refused(format!("process {} appeared after pre-copy started", p.pid)))?;
            if old.vmas == p.vmas {
                continue;
            }
            let kept = self.tree.relayout(old, p)?;
            // Pages outside what was kept went with their mappings.
            if let Some(w) = self.written.get_mut(&p.pid) {
                *w = intersect(&merge(std::mem::take(w)), &merge(kept));
            }
            self.layout.insert(p.pid, pb::Process { pid: p.pid, vmas: p.vmas.clone(), ..Default::default() });
        }
        Ok(())
    }

    /// Applies the final image (state, last pages) with the tree stopped:
    /// `present` lists per pid every page range the process had at the
    /// freeze; pages written earlier outside them are dropped.
    /// `pages_verified`: the caller checked pages.img as a whole already,
    /// so the runs' own checksums are not computed again.
    pub fn finish(
        mut self,
        dir: &std::path::Path,
        present: &HashMap<i32, Vec<(u64, u64)>>,
        pages_verified: bool,
    ) -> Result<Finished, RestoreError> {
        let t0 = std::time::Instant::now();
        self.tree.stop_filling();
        let chain = ImageChain::open(dir)?;
        let t_open = t0.elapsed();
        let img: &ImageReader = chain.newest();
        let m = &img.manifest;
        if m.parent.is_some() || m.pre_dump {
            return Err(refused("final image of a migration must be a standalone dump".into()));
        }
        let tasks: Vec<(i32, Vec<i32>)> = m
            .processes
            .iter()
            .map(|p| (p.pid, if p.zombie { Vec::new() } else { p.threads.iter().map(|t| t.tid).collect() }))
            .collect();
        if tasks != self.tasks {
            return Err(refused(format!(
                "processes or threads changed during pre-copy (at start {:?}, at the freeze {:?}); migrate again",
                self.tasks, tasks
            )));
        }
        self.relayout(&m.processes)?;
        let t_relayout = t0.elapsed();
        for p in m.processes.iter().filter(|p| !p.zombie) {
            let Some(w) = self.written.remove(&p.pid) else { continue };
            let shared: Vec<(u64, u64)> = p
                .vmas
                .iter()
                .filter(|v| v.kind == pb::VmaKind::AnonShared as i32 || v.kind == pb::VmaKind::FileShared as i32)
                .map(|v| (v.start, v.end))
                .collect();
            let keep = merge(present.get(&p.pid).cloned().unwrap_or_default().into_iter().chain(shared).collect());
            let stale = subtract_all(&merge(w), &keep);
            if !stale.is_empty() {
                self.tree.drop_pages(p.pid, &stale)?;
            }
        }
        let t_drop = t0.elapsed();
        let bytes = if pages_verified {
            load_pages_preverified(&chain, &mut self.tree)?
        } else {
            load_pages(&chain, &mut self.tree)?
        };
        self.pages_written += bytes / 4096;
        let t_pages = t0.elapsed();
        self.tree.finish_stopped(img, &self.pre)?;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        tracing::info!(
            open_ms = ms(t_open),
            relayout_ms = ms(t_relayout - t_open),
            drop_ms = ms(t_drop - t_relayout),
            pages_ms = ms(t_pages - t_drop),
            finish_ms = ms(t0.elapsed() - t_pages),
            bytes,
            "migration target: final image applied"
        );
        Ok(Finished { tree: Some(self.tree), processes: m.processes.clone(), root: m.root_pid })
    }
}

/// A migrated tree with all its state, still stopped. Dropping it kills it.
pub struct Finished {
    tree: Option<Tree>,
    processes: Vec<pb::Process>,
    root: i32,
}

impl Finished {
    /// The root's pid.
    pub fn root_pid(&self) -> i32 {
        self.root
    }

    /// The root's pid as this host sees it (differs under `new_pidns`).
    pub fn host_pid(&self) -> i32 {
        self.tree.as_ref().map(|t| t.root_pid()).unwrap_or(0)
    }

    /// Lets the tree run (the source has committed). Returns the root's
    /// host pid and the pid to wait for to reap it (the pid namespace's init
    /// under `new_pidns`).
    pub fn release(mut self) -> Result<(i32, i32), RestoreError> {
        let tree = self.tree.take().ok_or_else(|| refused("tree already released".into()))?;
        let init = tree.ns_init;
        let pid = tree.release(&self.processes)?;
        Ok((pid, init.unwrap_or(pid)))
    }
}

/// The established TCP connections an image restores (for the target's
/// network lock), as (local, remote).
pub fn image_connections(m: &pb::Manifest) -> Vec<floe_netfilter::ConnTuple> {
    let addr = |ip: &[u8], port: u32| -> Option<std::net::SocketAddr> {
        let port = u16::try_from(port).ok()?;
        match ip.len() {
            4 => Some(std::net::SocketAddr::from(([ip[0], ip[1], ip[2], ip[3]], port))),
            16 => {
                let mut b = [0u8; 16];
                b.copy_from_slice(ip);
                Some(std::net::SocketAddr::from((std::net::Ipv6Addr::from(b), port)))
            }
            _ => None,
        }
    };
    m.files
        .iter()
        .filter_map(|f| f.inet_socket.as_ref())
        .filter(|s| s.tcp.is_some())
        .filter_map(|s| {
            Some(floe_netfilter::ConnTuple::new(
                addr(&s.local_addr, s.local_port)?,
                addr(&s.remote_addr, s.remote_port)?,
            ))
        })
        .collect()
}

fn merge(v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    crate::dump::merge_ranges(v)
}

/// Both sorted, merged.
fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let s = a[i].0.max(b[j].0);
        let e = a[i].1.min(b[j].1);
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// `a` minus `b` (both sorted, merged).
fn subtract_all(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in a {
        let mut cur = s;
        for &(bs, be) in b.iter().skip_while(|x| x.1 <= s) {
            if bs >= e {
                break;
            }
            if bs > cur {
                out.push((cur, bs));
            }
            cur = cur.max(be);
        }
        if cur < e {
            out.push((cur, e));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_algebra() {
        let a = merge(vec![(10, 20), (0, 5), (15, 30)]);
        assert_eq!(a, vec![(0, 5), (10, 30)]);
        assert_eq!(intersect(&a, &[(3, 12), (25, 40)]), vec![(3, 5), (10, 12), (25, 30)]);
        assert_eq!(subtract_all(&a, &[(3, 12), (25, 40)]), vec![(0, 3), (12, 25)]);
        assert_eq!(subtract_all(&a, &[]), a);
    }
}
