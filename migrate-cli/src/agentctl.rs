//! `floe migrate` and `floe status`: requests to the local floe-agent over
//! its control socket, and how their events are shown.
use anyhow::{bail, Context, Result};
use floe_proto::control::{control_request::Req, ControlEvent, ControlRequest, MigrateRequest, StatusRequest};
use floe_proto::frame::{self, Header, HEADER_LEN};
use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

fn connect(sock: &Path) -> Result<UnixStream> {
    UnixStream::connect(sock).with_context(|| {
        format!(
            "cannot reach floe-agent at {} (is it running? start it with `systemctl start floe-agent` or `floe-agent -c CONFIG`; floe must run as root)",
            sock.display()
        )
    })
}

fn read_event(s: &mut UnixStream) -> Result<Option<ControlEvent>> {
    let mut h = [0u8; HEADER_LEN];
    match s.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e).context("reading from floe-agent"),
    }
    let h = Header::parse(&h, 64 << 20).map_err(|e| anyhow::anyhow!("bad frame from floe-agent: {e}"))?;
    let mut payload = vec![0u8; h.len as usize];
    s.read_exact(&mut payload).context("reading from floe-agent")?;
    Ok(Some(frame::decode(&payload).map_err(|e| anyhow::anyhow!("bad event from floe-agent: {e}"))?))
}

fn request(sock: &Path, req: Req) -> Result<UnixStream> {
    let mut s = connect(sock)?;
    s.write_all(&frame::control(&ControlRequest { req: Some(req) })).context("sending the request to floe-agent")?;
    Ok(s)
}

fn num(v: &serde_json::Value, k: &str) -> f64 {
    v.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0)
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / (1 << 20) as f64)
}

/// Runs a migration; returns the exit code (0 only when the process runs on the target).
pub fn migrate(sock: &Path, req: MigrateRequest, json: bool) -> Result<i32> {
    let mut s = request(sock, Req::Migrate(req))?;
    let tty = !json && std::io::stderr().is_terminal();
    let mut sent = 0f64;
    let mut last_len = 0usize;
    loop {
        let Some(ev) = read_event(&mut s)? else {
            bail!("floe-agent closed the connection before the migration ended; see its log and `floe status`")
        };
        let v: serde_json::Value = serde_json::from_str(&ev.json).unwrap_or(serde_json::Value::Null);
        if json {
            println!("{}", ev.json);
            std::io::stdout().flush().ok();
        }
        match ev.kind.as_str() {
            "report" => {
                if tty && last_len > 0 {
                    eprintln!();
                }
                if !json {
                    print_report(&v);
                }
                return Ok(0);
            }
            "error" => {
                if tty && last_len > 0 {
                    eprintln!();
                }
                let msg = v.get("message").and_then(|m| m.as_str()).unwrap_or(&ev.json);
                eprintln!("floe: migration failed: {msg}");
                return Ok(1);
            }
            "warning" if !json => {
                if tty && last_len > 0 {
                    eprintln!();
                    last_len = 0;
                }
                eprintln!("floe: warning: {}", v.get("message").and_then(|m| m.as_str()).unwrap_or(""));
            }
            "pass" => {
                sent += num(&v, "wire_bytes");
                if !json {
                    let line = format!(
                        "[precopy] pass {:>2}  sent {:>10}  this pass {:>10} at {:>7.1} MiB/s  remaining ~{:>10}  est. downtime {:>6.1} ms",
                        num(&v, "pass"),
                        mib(sent),
                        mib(num(&v, "page_bytes")),
                        num(&v, "rate_mib_s"),
                        mib(num(&v, "remaining_bytes")),
                        num(&v, "est_downtime_ms"),
                    );
                    show(tty, &line, &mut last_len);
                }
            }
            "phase" if !json => {
                let line = format!(
                    "[{}] {}",
                    v.get("phase").and_then(|p| p.as_str()).unwrap_or(""),
                    v.get("detail").and_then(|p| p.as_str()).unwrap_or("")
                );
                show(tty, &line, &mut last_len);
            }
            _ => {}
        }
    }
}

fn show(tty: bool, line: &str, last_len: &mut usize) {
    if tty {
        let pad = last_len.saturating_sub(line.len());
        eprint!("\r{line}{}", " ".repeat(pad));
        *last_len = line.len();
    } else {
        eprintln!("{line}");
    }
}

fn print_report(v: &serde_json::Value) {
    let d = v.get("downtime").cloned().unwrap_or(serde_json::Value::Null);
    println!(
        "migrated pid {} to {} (pid {} there) in {:.0} ms",
        num(v, "pid"),
        v.get("target").and_then(|t| t.as_str()).unwrap_or("?"),
        num(v, "target_pid"),
        num(v, "total_ms")
    );
    println!(
        "  downtime {:.1} ms: freeze {:.1}, final scan {:.1}, final dump {:.1}, final transfer {:.1}, restore finish {:.1}, resume {:.1}",
        num(&d, "total_ms"),
        num(&d, "freeze_ms"),
        num(&d, "final_scan_ms"),
        num(&d, "final_dump_ms"),
        num(&d, "final_transfer_ms"),
        num(&d, "restore_finish_ms"),
        num(&d, "resume_ms")
    );
    let t = d.get("target").cloned().unwrap_or(serde_json::Value::Null);
    println!(
        "    on the target: receive {:.1}, lock {:.1}, addresses {:.1}, finish {:.1}; unlock {:.1}, release {:.1}, {} dropped segments delivered in {:.1}",
        num(&t, "receive_ms"),
        num(&t, "lock_ms"),
        num(&t, "address_ms"),
        num(&t, "finish_ms"),
        num(&t, "unlock_ms"),
        num(&t, "release_ms"),
        num(&t, "reinjected"),
        num(&t, "reinject_ms")
    );
    println!(
        "  {} pre-copy passes ({}), {} of page data sent as {} on the wire for {} of memory; dirty tracker {}",
        num(v, "iterations"),
        if v.get("converged").and_then(|c| c.as_bool()).unwrap_or(false) { "converged" } else { "did not converge" },
        mib(num(v, "page_bytes_sent")),
        mib(num(v, "wire_bytes")),
        mib(num(v, "memory_bytes")),
        v.get("dirty_tracker").and_then(|t| t.as_str()).unwrap_or("?")
    );
}

/// `floe status`: migrations in flight on the local agent.
pub fn status(sock: &Path, json: bool) -> Result<i32> {
    let mut s = request(sock, Req::Status(StatusRequest {}))?;
    let ev = read_event(&mut s)?.context("floe-agent sent no status")?;
    if json {
        println!("{}", ev.json);
        return Ok(0);
    }
    let v: serde_json::Value = serde_json::from_str(&ev.json).context("bad status from floe-agent")?;
    let empty = Vec::new();
    let list = v.get("in_flight").and_then(|l| l.as_array()).unwrap_or(&empty);
    println!("agent {}: {} migration(s) in flight", v.get("agent").and_then(|a| a.as_str()).unwrap_or("?"), list.len());
    for m in list {
        println!(
            "  {}  {:<6} pid {:<8} peer {:<16} {:<8} pass {:<3} {}",
            m.get("id").and_then(|x| x.as_str()).unwrap_or(""),
            m.get("role").and_then(|x| x.as_str()).unwrap_or(""),
            num(m, "pid"),
            m.get("peer").and_then(|x| x.as_str()).unwrap_or(""),
            m.get("phase").and_then(|x| x.as_str()).unwrap_or(""),
            num(m, "pass"),
            mib(num(m, "bytes_sent"))
        );
    }
    // The journal's latest outcomes (an in-doubt migration shows as "committing").
    let mut recent: Vec<&serde_json::Value> =
        v.get("recent").and_then(|l| l.as_array()).map(|a| a.iter().collect()).unwrap_or_default();
    recent.sort_by_key(|e| std::cmp::Reverse(e.get("updated_unix_ms").and_then(|t| t.as_u64()).unwrap_or(0)));
    if !recent.is_empty() {
        println!("recent migrations (newest first):");
    }
    for e in recent.iter().take(10) {
        println!(
            "  {}  {:<6} pid {:<8} peer {:<16} {}",
            e.get("id").and_then(|x| x.as_str()).unwrap_or(""),
            e.get("role").and_then(|x| x.as_str()).unwrap_or(""),
            num(e, "pid"),
            e.get("peer").and_then(|x| x.as_str()).unwrap_or(""),
            e.get("state").and_then(|x| x.as_str()).unwrap_or("")
        );
    }
    Ok(0)
}
