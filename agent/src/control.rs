//! The local control socket: `floe migrate` and `floe status` talk to the
//! agent here. Only root may connect (the socket is 0600 and the peer's
//! credentials are checked).
use crate::events::Events;
use crate::state::Agent;
use crate::wire;
use floe_proto::control::{control_request::Req, ControlEvent, ControlRequest};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use tokio::net::{UnixListener, UnixStream};

/// Binds the control socket (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        // A live agent answers on it; then this one must not steal it.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by another floe-agent", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(agent: Arc<Agent>, listener: UnixListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(c) if c.uid() == 0 => {}
            Ok(c) => {
                tracing::warn!(uid = c.uid(), "control connection from a non-root user refused");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the control client's credentials; refused");
                continue;
            }
        }
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(agent, stream).await {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
    }
}

async fn handle(agent: Arc<Agent>, stream: UnixStream) -> Result<(), wire::WireError> {
    let (mut rd, mut wr) = stream.into_split();
    let req: ControlRequest = wire::read_control(&mut rd, 1 << 20).await?;
    match req.req {
        Some(Req::Status(_)) => {
            let body = serde_json::json!({
                "event": "status",
                "agent": agent.cfg.name,
                "in_flight": agent.list(),
                "recent": agent.journal.all(),
            });
            wire::write_control(&mut wr, &ControlEvent { kind: "status".into(), json: body.to_string() }).await?;
        }
        Some(Req::Migrate(m)) => {
            if !m.test_hook.is_empty() {
                let ev = ControlEvent {
                    kind: "error".into(),
                    json: serde_json::json!({"event": "error", "message": "test hooks are set on the agents (FLOE_TEST_HOOK), not per request"}).to_string(),
                };
                wire::write_control(&mut wr, &ev).await?;
                return Ok(());
            }
            let (tx, mut rx) = tokio::sync::mpsc::channel::<ControlEvent>(64);
            let events = Events::new(tx.clone());
            let a = agent.clone();
            // The migration carries on if the requester goes away.
            tokio::spawn(async move {
                let r = crate::source::migrate(a, m, events).await;
                let ev = match r {
                    Ok(report) => {
                        ControlEvent { kind: "report".into(), json: serde_json::to_string(&report).unwrap_or_default() }
                    }
                    Err(e) => {
                        let msg = crate::worker::chain(&e);
                        tracing::error!(error = %msg, "migration failed");
                        ControlEvent {
                            kind: "error".into(),
                            json: serde_json::json!({"event": "error", "message": msg}).to_string(),
                        }
                    }
                };
                let _ = tx.send(ev).await;
            });
            while let Some(ev) = rx.recv().await {
                let last = ev.kind == "report" || ev.kind == "error";
                // Keep draining if the client left, so the migration never blocks on it.
                let _ = wire::write_control(&mut wr, &ev).await;
                if last {
                    break;
                }
            }
        }
        None => {}
    }
    Ok(())
}
