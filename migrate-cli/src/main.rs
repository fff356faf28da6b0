//! `floe`: checkpoint/restore and live migration of Linux processes.
mod agentctl;
mod inspect;
mod sys;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use floe_engine::{check, dump, restore};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "floe", version, about = "Checkpoint, restore and live-migrate Linux processes")]
struct Cli {
    /// Log verbosity (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options shared by `dump` and `pre-dump` for incremental images.
#[derive(clap::Args, Clone)]
struct IncrementalArgs {
    /// Build on this earlier image (relative to --images-dir unless absolute): unchanged pages are not stored again.
    #[arg(long)]
    prev_images_dir: Option<PathBuf>,
    /// Keep per-page checksums so a later dump can build on this one.
    #[arg(long)]
    track_mem: bool,
    /// After writing, drop from the parent images the pages this one supersedes.
    #[arg(long)]
    auto_dedup: bool,
    /// How changed pages are found: auto, uffd, soft-dirty or hash.
    #[arg(long, default_value = "auto")]
    dirty_tracker: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Probe the running kernel for everything floe needs.
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Checkpoint a running process into an image directory.
    Dump {
        /// PID of the process to dump.
        #[arg(short = 't', long = "tree")]
        pid: i32,
        /// Image directory (created if missing).
        #[arg(short = 'D', long = "images-dir")]
        dir: PathBuf,
        /// Keep the process running after the dump (default: kill it).
        #[arg(long)]
        leave_running: bool,
        /// Allow a process attached to a terminal or to a session led outside the dump.
        #[arg(long)]
        shell_job: bool,
        /// Overwrite an existing image in the directory.
        #[arg(long)]
        force: bool,
        /// Dump file locks (flock, POSIX, OFD) held by the processes.
        #[arg(long)]
        file_locks: bool,
        /// Allow datagram unix sockets connected to a named socket outside the tree (reconnected on restore).
        #[arg(long)]
        ext_unix_sk: bool,
        /// Dump established TCP connections (TCP_REPAIR); their peers' packets are blocked until restore.
        #[arg(long)]
        tcp_established: bool,
        #[command(flatten)]
        inc: IncrementalArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy a running process tree's memory without stopping it for long; a later dump builds on it.
    PreDump {
        /// PID of the root of the tree.
        #[arg(short = 't', long = "tree")]
        pid: i32,
        /// Image directory (created if missing).
        #[arg(short = 'D', long = "images-dir")]
        dir: PathBuf,
        /// Allow a process attached to a terminal or to a session led outside the dump.
        #[arg(long)]
        shell_job: bool,
        /// Overwrite an existing image in the directory.
        #[arg(long)]
        force: bool,
        /// Allow datagram unix sockets connected to a named socket outside the tree.
        #[arg(long)]
        ext_unix_sk: bool,
        /// Dump file locks too.
        #[arg(long)]
        file_locks: bool,
        #[command(flatten)]
        inc: IncrementalArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drop from an image's parents every page it supersedes.
    Dedup {
        /// The newest image of the chain.
        #[arg(short = 'D', long = "images-dir")]
        dir: PathBuf,
    },
    /// Bring a process back from an image directory.
    Restore {
        /// Image directory.
        #[arg(short = 'D', long = "images-dir")]
        dir: PathBuf,
        /// Exit once the process runs instead of waiting for it.
        #[arg(short = 'd', long)]
        restore_detached: bool,
        /// Attach the process's terminal descriptors to floe's terminal.
        #[arg(long)]
        shell_job: bool,
        /// Restore into a new pid namespace, so the image's pids need not be free here.
        #[arg(short = 'n', long = "new-pidns")]
        new_pidns: bool,
        /// Restore established TCP connections (the image was dumped with --tcp-established).
        #[arg(long, conflicts_with = "tcp_close")]
        tcp_established: bool,
        /// Restore established TCP connections closed (the process sees them as gone).
        #[arg(long)]
        tcp_close: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move a running process tree to another host through the floe-agents (it keeps running during the copy).
    Migrate {
        /// PID of the root of the tree.
        pid: i32,
        /// Target: a peer name from the agent's [peers], or host:port.
        #[arg(long)]
        to: String,
        /// Freeze once the expected downtime is at most this many milliseconds.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        max_downtime: u32,
        /// Most pre-copy passes before giving up on convergence.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(2..))]
        max_iterations: u32,
        /// When pre-copy does not converge: freeze anyway (with a warning) or abort (the process keeps running here).
        #[arg(long, default_value = "freeze", value_parser = ["freeze", "abort"])]
        on_no_convergence: String,
        /// How changed pages are found: auto, uffd, soft-dirty or hash.
        #[arg(long, default_value = "auto")]
        dirty_tracker: String,
        /// zstd compression of page data: auto (when it outruns the link), on or off.
        #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
        compress: String,
        /// Restore in a new pid namespace on the target (the pids need not be free there).
        #[arg(short = 'n', long = "new-pidns")]
        new_pidns: bool,
        /// Migrate file locks held by the processes.
        #[arg(long)]
        file_locks: bool,
        /// Allow datagram unix sockets connected to a named socket outside the tree.
        #[arg(long)]
        ext_unix_sk: bool,
        /// Migrate established TCP connections (their peers notice nothing but a short pause).
        #[arg(long)]
        tcp_established: bool,
        /// A service address (IP/PREFIX) that moves with the process: removed here after the freeze, added on the target before its connections are restored. Repeatable.
        #[arg(long = "move-address", value_name = "IP/PREFIX")]
        move_address: Vec<String>,
        /// One JSON event per line on stdout (phases, passes, the final report).
        #[arg(long)]
        json: bool,
        /// The local agent's control socket.
        #[arg(long, env = "FLOE_AGENT_SOCKET", default_value = "/run/floe/agent.sock")]
        control_socket: PathBuf,
    },
    /// List the migrations in flight on the local floe-agent.
    Status {
        #[arg(long)]
        json: bool,
        /// The local agent's control socket.
        #[arg(long, env = "FLOE_AGENT_SOCKET", default_value = "/run/floe/agent.sock")]
        control_socket: PathBuf,
    },
    /// Create the cluster CA and host certificates for the agents (mutual TLS).
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Show what an image holds.
    Inspect {
        /// Image directory.
        dir: PathBuf,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create the cluster CA (ca.pem, ca.key) in --dir.
    Init {
        #[arg(long, default_value = "/etc/floe")]
        dir: PathBuf,
        /// Replace an existing CA (every host certificate must then be issued again).
        #[arg(long)]
        force: bool,
    },
    /// Issue HOST.pem and HOST.key, signed by the CA in --dir.
    Issue {
        /// Host name (the agent's `name`).
        host: String,
        /// Extra subject names: IP addresses or DNS names the host is reached by.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Directory holding the CA.
        #[arg(long, default_value = "/etc/floe")]
        dir: PathBuf,
        /// Where to write the host's files (default: --dir).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        force: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli.log_level.clone()));
    // Colours only on a terminal: logs go to files and journald too.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("floe: error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Migrate {
            pid,
            to,
            max_downtime,
            max_iterations,
            on_no_convergence,
            dirty_tracker,
            compress,
            new_pidns,
            file_locks,
            ext_unix_sk,
            tcp_established,
            move_address,
            json,
            control_socket,
        } => {
            let req = floe_proto::control::MigrateRequest {
                pid,
                to,
                max_downtime_ms: max_downtime,
                max_iterations,
                on_no_convergence,
                dirty_tracker,
                compress,
                file_locks,
                ext_unix_sk,
                test_hook: String::new(),
                new_pidns,
                tcp_established,
                move_address,
            };
            agentctl::migrate(&control_socket, req, json)
        }
        Cmd::Status { json, control_socket } => agentctl::status(&control_socket, json),
        Cmd::Certs { cmd: CertsCmd::Init { dir, force } } => {
            let p = floe_agent::certs::init_ca(&dir, force)?;
            println!("cluster CA written to {} (keep {} secret)", p.display(), dir.join("ca.key").display());
            Ok(0)
        }
        Cmd::Certs { cmd: CertsCmd::Issue { host, sans, dir, out, force } } => {
            let out = out.unwrap_or_else(|| dir.clone());
            let (c, k) = floe_agent::certs::issue_host(&dir, &host, &sans, &out, force)?;
            println!("certificate for {host}: {} and {}", c.display(), k.display());
            Ok(0)
        }
        Cmd::Check { json } => {
            let report = check::run_checks();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render_text());
            }
            Ok(if report.looks_good() { 0 } else { 1 })
        }
        Cmd::PreDump { pid, dir, shell_job, force, ext_unix_sk, file_locks, inc, json } => {
            let opts = dump::DumpOptions {
                pid,
                dir: dir.clone(),
                leave_running: true,
                shell_job,
                force,
                file_locks,
                ext_unix_sk,
                prev_images_dir: inc.prev_images_dir,
                track_mem: true,
                pre_dump: true,
                auto_dedup: inc.auto_dedup,
                dirty_tracker: inc.dirty_tracker,
                tcp_established: false,
                net_lock: String::new(),
                vma_flags_from: None,
            };
            let defer = sys::DeferTermination::new();
            let report =
                dump::dump(&opts).with_context(|| format!("pre-dump of pid {pid} into {} failed", dir.display()));
            drop(defer);
            let report = report?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "pre-dumped pid {} ({} process(es)) into {}: {:.1} MiB written, {} pages reused; stopped {:.1} ms (scan {:.1} ms), total {:.1} ms (tracker {})",
                    report.pid,
                    report.processes,
                    report.dir.display(),
                    report.page_bytes as f64 / 1048576.0,
                    report.reused_pages,
                    report.timings.frozen_ms,
                    report.timings.scan_ms,
                    report.timings.total_ms,
                    report.dirty_tracker
                );
            }
            Ok(0)
        }
        Cmd::Dedup { dir } => {
            let freed =
                floe_engine::image::dedup::dedup(&dir).with_context(|| format!("dedup of {} failed", dir.display()))?;
            println!("freed {:.1} MiB in the parents of {}", freed as f64 / 1048576.0, dir.display());
            Ok(0)
        }
        Cmd::Dump {
            pid,
            dir,
            leave_running,
            shell_job,
            force,
            file_locks,
            ext_unix_sk,
            tcp_established,
            inc,
            json,
        } => {
            let opts = dump::DumpOptions {
                pid,
                dir: dir.clone(),
                leave_running,
                shell_job,
                force,
                file_locks,
                ext_unix_sk,
                prev_images_dir: inc.prev_images_dir,
                track_mem: inc.track_mem,
                pre_dump: false,
                auto_dedup: inc.auto_dedup,
                dirty_tracker: inc.dirty_tracker,
                tcp_established,
                net_lock: String::new(),
                vma_flags_from: None,
            };
            let defer = sys::DeferTermination::new();
            let report = dump::dump(&opts).with_context(|| format!("dump of pid {pid} into {} failed", dir.display()));
            drop(defer);
            let report = report?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let t = &report.timings;
                println!(
                    "dumped pid {} ({} process(es), {} thread(s)) into {}: {} mappings, {} fds, {:.1} MiB of pages, image {:.1} MiB",
                    report.pid,
                    report.processes,
                    report.threads,
                    report.dir.display(),
                    report.vmas,
                    report.fds,
                    report.page_bytes as f64 / 1048576.0,
                    report.image_bytes as f64 / 1048576.0
                );
                println!(
                    "  freeze {:.1} ms, collect {:.1} ms, memory {:.1} ms, commit {:.1} ms; stopped {:.1} ms, total {:.1} ms; process {}",
                    t.freeze_ms,
                    t.collect_ms,
                    t.memory_ms,
                    t.commit_ms,
                    t.frozen_ms,
                    t.total_ms,
                    if report.left_running { "left running" } else { "killed" }
                );
            }
            Ok(0)
        }
        Cmd::Restore { dir, restore_detached, shell_job, new_pidns, tcp_established, tcp_close, json } => {
            let opts = restore::RestoreOptions {
                dir: dir.clone(),
                shell_job,
                new_pidns,
                tcp_established,
                tcp_close,
                tcp_hold: false,
            };
            let defer = sys::DeferTermination::new();
            let report = restore::restore(&opts).with_context(|| format!("restore from {} failed", dir.display()));
            drop(defer);
            let report = report?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else if restore_detached {
                let t = &report.timings;
                println!(
                    "restored pid {}{} ({} process(es), {:.1} MiB of pages): create {:.1} ms, pages {:.1} ms, finish {:.1} ms, total {:.1} ms",
                    report.pid,
                    if report.host_pid != report.pid { format!(" (pid {} outside its new pid namespace)", report.host_pid) } else { String::new() },
                    report.processes,
                    report.page_bytes as f64 / 1048576.0,
                    t.create_ms,
                    t.pages_ms,
                    t.finish_ms,
                    t.total_ms
                );
            }
            if restore_detached {
                return Ok(0);
            }
            let code = restore::wait_exit(report.wait_pid)?;
            Ok(code)
        }
        Cmd::Inspect { dir, json } => {
            let img = floe_engine::image::ImageReader::open(&dir)
                .with_context(|| format!("cannot open image {}", dir.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&inspect::to_json(&img))?);
            } else {
                print!("{}", inspect::to_text(&img));
            }
            Ok(0)
        }
    }
}
