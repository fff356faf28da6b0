//! Events of a migration for `floe migrate` (progress, `--json` lines, the report).
use floe_proto::control::ControlEvent;
use serde::Serialize;
use tokio::sync::mpsc;

/// Where a migration's events go (the requesting `floe` process).
#[derive(Clone)]
pub struct Events {
    tx: Option<mpsc::Sender<ControlEvent>>,
}

impl Events {
    pub fn new(tx: mpsc::Sender<ControlEvent>) -> Self {
        Self { tx: Some(tx) }
    }

    /// Events dropped (no requester).
    pub fn none() -> Self {
        Self { tx: None }
    }

    pub async fn emit<T: Serialize>(&self, kind: &str, body: &T) {
        let json = serde_json::to_string(body).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
        if let Some(tx) = &self.tx {
            // The requester may have gone away; the migration carries on.
            let _ = tx.send(ControlEvent { kind: kind.to_string(), json }).await;
        }
    }

    pub async fn phase(&self, phase: &str, detail: &str) {
        tracing::info!(phase, detail, "migration phase");
        self.emit("phase", &serde_json::json!({"event": "phase", "phase": phase, "detail": detail})).await;
    }

    pub async fn warning(&self, message: &str) {
        tracing::warn!(message, "migration warning");
        self.emit("warning", &serde_json::json!({"event": "warning", "message": message})).await;
    }
}
