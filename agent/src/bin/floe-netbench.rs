//! floe-netbench: the network baselines of the live-migration benchmark (bench/migrate.sh).
//!
//! Two bulk transfers of N bytes over the path a migration takes, each a sender and a receiver:
//!
//! * `quic-server` / `quic-client`: one bidirectional QUIC stream over an endpoint built exactly
//!   like the agent's: the same [`Identity`] files (mutual TLS, cluster CA), ALPN and transport
//!   [`Tuning`]. The agent listens with `Tuning::default()` plus its `[tuning]` overrides
//!   (`--initial-mtu`/`--max-mtu` here), and the migration source connects with that tuning
//!   started at the full packet size of the link towards the peer
//!   (`Tuning::for_path_mtu(link_mtu_for(peer))`, see `connect` in agent/src/source.rs); the
//!   server and the client here do the same (`--no-link-mtu`: the configured tuning only). The
//!   sender writes 16 MiB buffers with `write_all` and the receiver reads into a 16 MiB buffer,
//!   one copy on each side, as the agent does with its page batches. This is the QUIC ceiling a
//!   pre-copy pass can reach.
//! * `tcp-server` / `tcp-client`: a plain TCP copy with 32 MiB socket buffers and 16 MiB writes.
//!
//! The clock starts once the connection is up and stops when the receiver acknowledges the last
//! byte (8 bytes back: the count it received), like a pre-copy pass that ends with the target's
//! acknowledgement. The client prints one JSON line `{"bytes":N,"secs":S,"gib_s":X,...}` on
//! stdout; the server prints the same from its side and exits after one transfer.
use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Parser, Subcommand};
use floe_agent::tls::{self, Identity, Tuning};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Size of every write (and of the receive buffer).
const CHUNK: usize = 16 << 20;
/// Socket buffers of the TCP baseline: the size the agent asks for its UDP socket.
const TCP_SOCKET_BUFFER: usize = 32 << 20;

#[derive(Parser)]
#[command(name = "floe-netbench", version, about = "QUIC and TCP bulk-transfer baselines for bench/migrate.sh")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Receive one QUIC bulk transfer, then exit.
    QuicServer {
        /// Address to listen on (UDP).
        #[arg(long)]
        listen: SocketAddr,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        common: ServerArgs,
    },
    /// Send N bytes over one QUIC stream and print the throughput.
    QuicClient {
        /// The server's address.
        #[arg(long)]
        connect: SocketAddr,
        /// The name the server's certificate must carry (its host name).
        #[arg(long)]
        server_name: String,
        #[command(flatten)]
        tls: TlsArgs,
        /// Bytes to send.
        #[arg(long)]
        bytes: u64,
    },
    /// Receive one TCP bulk transfer, then exit.
    TcpServer {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        #[command(flatten)]
        common: ServerArgs,
    },
    /// Send N bytes over one TCP connection and print the throughput.
    TcpClient {
        /// The server's address.
        #[arg(long)]
        connect: SocketAddr,
        /// Bytes to send.
        #[arg(long)]
        bytes: u64,
    },
}

/// The agent's identity files and transport tuning.
#[derive(Args)]
struct TlsArgs {
    /// Cluster CA certificate (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// This host's certificate (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// This host's private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// As the agent's `[tuning] initial_mtu`.
    #[arg(long)]
    initial_mtu: Option<u16>,
    /// As the agent's `[tuning] max_mtu`.
    #[arg(long)]
    max_mtu: Option<u16>,
    /// Client: do not start at the packet size of the link towards the server (the migration
    /// source does); use the configured tuning as it is.
    #[arg(long)]
    no_link_mtu: bool,
}

#[derive(Args)]
struct ServerArgs {
    /// Give up when no transfer has completed within this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Exit after one transfer (always the case; accepted for clarity).
    #[arg(long)]
    once: bool,
}

/// What one transfer measured.
#[derive(serde::Serialize)]
struct Measurement {
    bytes: u64,
    secs: f64,
    gib_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    mtu: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lost_packets: Option<u64>,
}

impl Measurement {
    fn new(bytes: u64, elapsed: Duration) -> Measurement {
        let secs = elapsed.as_secs_f64();
        let gib_s = if secs > 0.0 { bytes as f64 / f64::from(1u32 << 30) / secs } else { 0.0 };
        Measurement { bytes, secs, gib_s, mtu: None, lost_packets: None }
    }

    fn print(&self) -> Result<()> {
        let line = serde_json::to_string(self).context("cannot encode the result")?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").and_then(|()| out.flush()).context("cannot write the result to stdout")
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .or_else(|_| tracing_subscriber::EnvFilter::try_new("warn"))
                .context("bad RUST_LOG filter")?,
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::QuicServer { listen, tls, common } => runtime()?.block_on(quic_server(listen, &tls, &common)),
        Cmd::QuicClient { connect, server_name, tls, bytes } => {
            runtime()?.block_on(quic_client(connect, &server_name, &tls, bytes))
        }
        Cmd::TcpServer { listen, common } => tcp_server(listen, &common),
        Cmd::TcpClient { connect, bytes } => tcp_client(connect, bytes),
    }
}

/// The agent's runtime: tokio, multi-threaded.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the tokio runtime")
}

/// The agent's tuning: `Tuning::default()` with the `[tuning]` overrides applied as
/// `AgentConfig::apply_tuning` does; towards `peer` (a connecting client), started at the packet
/// size of the link to it, as the migration source's `connect` does.
fn tuning(args: &TlsArgs, peer: Option<IpAddr>) -> Tuning {
    let mut t = Tuning::default();
    if let Some(initial) = args.initial_mtu {
        t.initial_mtu = initial;
        t.max_mtu = t.max_mtu.max(initial);
    }
    if let Some(max) = args.max_mtu {
        t.max_mtu = max;
        t.initial_mtu = t.initial_mtu.min(max);
    }
    if let Some(mtu) = peer.filter(|_| !args.no_link_mtu).and_then(tls::link_mtu_for) {
        let link = Tuning::for_path_mtu(mtu);
        t.initial_mtu = link.initial_mtu;
        t.max_mtu = t.max_mtu.max(link.max_mtu);
    }
    t
}

fn identity(args: &TlsArgs) -> Result<Identity> {
    Ok(Identity::load(&args.ca, &args.cert, &args.key)?)
}

/// A pseudo-random buffer (incompressible, no zero pages).
fn payload() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = Vec::with_capacity(CHUNK);
    while buf.len() < CHUNK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf.extend_from_slice(&x.to_le_bytes());
    }
    buf
}

async fn quic_server(listen: SocketAddr, args: &TlsArgs, common: &ServerArgs) -> Result<()> {
    let id = identity(args)?;
    let t = tuning(args, None);
    let endpoint = tls::server_endpoint(listen, &id, &t).with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("floe-netbench: quic listening on {listen} (initial_mtu {}, max_mtu {})", t.initial_mtu, t.max_mtu);
    let limit = Duration::from_secs(common.timeout);
    let received = tokio::time::timeout(limit, async {
        let incoming = endpoint.accept().await.context("the endpoint closed")?;
        let remote = incoming.remote_address();
        let conn = incoming.await.with_context(|| format!("handshake with {remote} failed"))?;
        let (mut send, mut recv) = conn.accept_bi().await.context("the client opened no stream")?;
        let mut buf = vec![0u8; CHUNK];
        let t0 = Instant::now();
        let mut total = 0u64;
        while let Some(n) = recv.read(&mut buf).await.context("receiving")? {
            total += n as u64;
        }
        send.write_all(&total.to_le_bytes()).await.context("sending the acknowledgement")?;
        send.finish().context("finishing the acknowledgement")?;
        // Wait until the client has the acknowledgement (it closes the connection).
        let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
        Ok::<_, anyhow::Error>(Measurement::new(total, t0.elapsed()))
    })
    .await
    .with_context(|| format!("no transfer completed within {} s", common.timeout))??;
    endpoint.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    received.print()
}

async fn quic_client(addr: SocketAddr, server_name: &str, args: &TlsArgs, bytes: u64) -> Result<()> {
    let id = identity(args)?;
    let t = tuning(args, Some(addr.ip()));
    let bind: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let endpoint = tls::client_endpoint(bind, &id, &t).context("cannot create the QUIC endpoint")?;
    let connecting = tls::connect(&endpoint, addr, server_name)?;
    let conn = tokio::time::timeout(Duration::from_secs(15), connecting)
        .await
        .with_context(|| format!("no answer from {addr} within 15 s (is quic-server running there?)"))?
        .with_context(|| format!("cannot connect to {server_name} at {addr}"))?;
    let data = payload();
    let t0 = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await.context("cannot open a stream")?;
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        send.write_all(&data[..n]).await.context("sending")?;
        left -= n as u64;
    }
    send.finish().context("finishing the stream")?;
    let ack = recv.read_to_end(64).await.context("waiting for the acknowledgement")?;
    let elapsed = t0.elapsed();
    let got = ack.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    ensure!(got == Some(bytes), "the server acknowledged {got:?} bytes, {bytes} were sent");
    let stats = conn.stats();
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    let mut m = Measurement::new(bytes, elapsed);
    m.mtu = Some(stats.path.current_mtu);
    m.lost_packets = Some(stats.path.lost_packets);
    m.print()
}

/// Asks for `size`-byte receive and send buffers on a socket, bypassing `net.core.rmem_max` /
/// `wmem_max` as root (the FORCE options), else within them.
fn set_socket_buffers(fd: &impl std::os::fd::AsFd, size: usize) -> Result<()> {
    let value = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX).min(libc::c_int::MAX / 2);
    for (force, plain, what) in
        [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "SO_RCVBUF"), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "SO_SNDBUF")]
    {
        let fd = std::os::fd::AsFd::as_fd(fd);
        if floe_agent::sys::set_int_option(fd, libc::SOL_SOCKET, force, value).is_err() {
            floe_agent::sys::set_int_option(fd, libc::SOL_SOCKET, plain, value)
                .with_context(|| format!("setsockopt({what}, {value})"))?;
        }
    }
    Ok(())
}

fn tcp_server(listen: SocketAddr, common: &ServerArgs) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    // Accepted sockets inherit the listener's buffer sizes (and the window scale they imply).
    set_socket_buffers(&listener, TCP_SOCKET_BUFFER).context("cannot size the socket buffers")?;
    eprintln!("floe-netbench: tcp listening on {listen}");
    let deadline = Instant::now() + Duration::from_secs(common.timeout);
    listener.set_nonblocking(true).context("cannot make the listener non-blocking")?;
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    bail!("no client within {} s", common.timeout);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accept failed"),
        }
    };
    stream.set_nonblocking(false).context("cannot make the connection blocking")?;
    stream.set_read_timeout(Some(Duration::from_secs(common.timeout))).context("cannot set a read timeout")?;
    let mut buf = vec![0u8; CHUNK];
    let t0 = Instant::now();
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("receiving"),
        }
    }
    stream.write_all(&total.to_le_bytes()).context("sending the acknowledgement")?;
    Measurement::new(total, t0.elapsed()).print()
}

fn tcp_client(addr: SocketAddr, bytes: u64) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(15))
        .with_context(|| format!("cannot connect to {addr} (is tcp-server running there?)"))?;
    set_socket_buffers(&stream, TCP_SOCKET_BUFFER).context("cannot size the socket buffers")?;
    stream.set_nodelay(true).context("cannot set TCP_NODELAY")?;
    let data = payload();
    let t0 = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        stream.write_all(&data[..n]).context("sending")?;
        left -= n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write).context("closing the sending side")?;
    let mut ack = [0u8; 8];
    stream.read_exact(&mut ack).context("waiting for the acknowledgement")?;
    let elapsed = t0.elapsed();
    let got = u64::from_le_bytes(ack);
    ensure!(got == bytes, "the server acknowledged {got} bytes, {bytes} were sent");
    Measurement::new(bytes, elapsed).print()
}
