//! floe-agent: listens for migrations from peer agents (QUIC, mutual TLS)
//! and runs the local `floe migrate` requests.
use anyhow::Context;
use clap::Parser;
use floe_agent::{config::AgentConfig, control, journal::Journal, state, target, tls};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "floe-agent", version, about = "floe's per-host live-migration agent")]
struct Args {
    /// Agent configuration (TOML; see deploy/agent.toml.example).
    #[arg(short, long, default_value = "/etc/floe/agent.toml")]
    config: PathBuf,
    /// Check the configuration and certificates, then exit.
    #[arg(long)]
    check: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = AgentConfig::load(&args.config).with_context(|| format!("loading {}", args.config.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.log))
        .context("bad log filter in the configuration")?;
    // Colours only on a terminal: logs go to files and journald too.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
    let id = tls::Identity::load(&cfg.ca_path(), &cfg.cert_path(), &cfg.key_path())?;
    if id.name() != cfg.name {
        anyhow::bail!(
            "the certificate {} is for {:?} but this agent is named {:?}; issue one with `floe certs issue {}`",
            cfg.cert_path().display(),
            id.name(),
            cfg.name,
            cfg.name
        );
    }
    if args.check {
        println!("configuration and certificates of {} are fine", cfg.name);
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(cfg, id))
}

async fn run(cfg: AgentConfig, id: tls::Identity) -> anyhow::Result<()> {
    let tuning = cfg.apply_tuning(tls::Tuning::default());
    let endpoint =
        tls::server_endpoint(cfg.listen, &id, &tuning).with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let journal = Journal::open(&cfg.data_dir).with_context(|| format!("cannot use {}", cfg.data_dir.display()))?;
    // Final images in transit: memory-backed when /dev/shm is (they are
    // small and short-lived), per agent (several may share a machine).
    let shm = PathBuf::from("/dev/shm");
    let base = if floe_agent::sys::is_tmpfs(&shm) { shm.join("floe") } else { PathBuf::from("/run/floe") };
    let run_dir = base.join(&cfg.name);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    // Scratch left by an earlier run of this agent (final images in transit).
    if let Ok(rd) = std::fs::read_dir(&run_dir) {
        for d in rd.flatten() {
            let n = d.file_name().to_string_lossy().into_owned();
            if (n.starts_with("mig-") || n.starts_with("in-")) && d.path().is_dir() {
                let _ = std::fs::remove_dir_all(d.path());
            }
        }
    }
    let control = control::bind(&cfg.control_socket)
        .with_context(|| format!("cannot bind the control socket {}", cfg.control_socket.display()))?;
    let agent = Arc::new(state::Agent {
        cfg: cfg.clone(),
        endpoint: endpoint.clone(),
        journal,
        in_flight: std::sync::Mutex::new(Default::default()),
        hooks: state::Hooks::from_env(),
        identity: id,
        tuning,
        run_dir,
    });
    // Network locks of migrations an earlier run of this agent left behind
    // (its connections are gone or still in repair mode: silent either way).
    match floe_netfilter::remove_stale("floe_mig_") {
        Ok(gone) if !gone.is_empty() => tracing::warn!(tables = ?gone, "removed network locks left by an earlier run"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot look for stale network locks"),
    }
    floe_agent::source::resolve_after_restart(agent.clone());
    tracing::info!(name = %cfg.name, listen = %cfg.listen, control = %cfg.control_socket.display(), "floe-agent ready");
    let a = agent.clone();
    tokio::spawn(async move { control::serve(a, control).await });
    let a = agent.clone();
    let accept = async move {
        while let Some(incoming) = endpoint.accept().await {
            let a = a.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => target::serve(a, conn).await,
                    Err(e) => tracing::warn!(%remote, error = %e, "peer connection refused (TLS handshake failed)"),
                }
            });
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = accept => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
        _ = term.recv() => tracing::info!("terminated; stopping"),
    }
    let _ = std::fs::remove_file(&cfg.control_socket);
    // Scratch of this agent (empty unless a migration was cut short).
    let _ = std::fs::remove_dir_all(&agent.run_dir);
    Ok(())
}
