//! `shardgate`: the proxy daemon and its command-line tools.

mod admin;
mod app;
mod auth;
mod cancel;
mod clock;
mod copy_rows;
mod health;
mod metrics;
mod mover;
mod moves;
mod pool;
mod protocol;
mod rebalance_cli;
mod roles;
mod routing;
mod server;
mod session;
mod settings;
mod shardmap_cli;
mod startup;
mod stream;
mod tally;
mod tls;
mod topology;
mod twophase;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use shardgate_config::Config;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(name = "shardgate", version, about = "Sharding-aware PostgreSQL proxy")]
struct Cli {
    /// Configuration file (TOML).
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file and exit (0 when valid).
    CheckConfig {
        /// The file to check (default: --config).
        file: Option<PathBuf>,
    },
    /// Read, create and compare shard map files.
    #[command(subcommand)]
    Shardmap(shardmap_cli::ShardmapCommand),
    /// Plan, apply and follow slot moves through a running shardgate's admin console.
    Rebalance(rebalance_cli::RebalanceArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Some(Command::Rebalance(args)) => rebalance_cli::run(args, cli.config.as_deref()),
        Some(Command::Shardmap(cmd)) => match shardmap_cli::run(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shardgate shardmap: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::CheckConfig { file }) => {
            let Some(path) = file.or(cli.config) else {
                eprintln!("shardgate check-config: no file given");
                return ExitCode::from(2);
            };
            match Config::load(&path) {
                Ok(_) => {
                    println!("{}: ok", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        None => {
            let Some(path) = cli.config else {
                eprintln!("shardgate: --config FILE is required (see --help)");
                return ExitCode::from(2);
            };
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let workers = match config.general.workers {
                0 => std::thread::available_parallelism()
                    .map(|n| (n.get() / 4).max(1))
                    .unwrap_or(1),
                n => n,
            };
            // One thread: a current-thread runtime, which skips the work-stealing
            // scheduler's bookkeeping (per-batch timing, cross-thread wake-ups): 0.5 to
            // 0.9 CPU-µs less per pgbench -S transaction than one worker thread.
            let runtime = if workers == 1 {
                tally::one_writer();
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(workers)
                    .enable_all()
                    .build()
            };
            let runtime = match runtime {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("shardgate: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(config, path)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("shardgate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHARDGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn serve(config: Config, path: PathBuf) -> Result<(), String> {
    // The recorder goes in before any handle is registered, or the handles are no-ops.
    let metrics_handle = match config.general.metrics_listen {
        Some(_) => Some(metrics::install()?),
        None => None,
    };
    let listen = config.general.listen;
    let process = app::Process::new(path);
    let app = process.start(config)?;
    let dbs: Vec<String> = app.topologies.keys().cloned().collect();
    start_health_checks(&app, &dbs).await;
    twophase::spawn_recovery(app.clone());
    mover::recover(&app).await;
    mover::spawn_rebalancer(process.clone());
    spawn_reload_on_sighup(process.clone());
    if let (Some(addr), Some(handle)) = (app.config.general.metrics_listen, metrics_handle) {
        let shards = app.topologies.values().flatten().cloned().collect();
        metrics::serve(addr, handle, shards, process.clone()).await?;
    }
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    tracing::info!(%listen, "shardgate ready");
    let accept = async {
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let current = process.current().unwrap_or_else(|| app.clone());
            tokio::spawn(startup::serve_client(current, tcp));
        }
    };
    let shutdown = tokio::select! {
        () = accept => return Ok(()),
        s = shutdown_signal() => s,
        () = process.shutdown.notified() => Shutdown::Graceful,
    };
    drop(listener);
    match shutdown {
        Shutdown::Fast => tracing::info!("SIGINT: shutting down now"),
        Shutdown::Graceful => drain(&app).await,
    }
    Ok(())
}

/// SIGTERM: no new clients; sessions end as their transactions finish (idle ones at once,
/// with 57P01); whatever remains after `shutdown_timeout` is disconnected.
async fn drain(app: &Arc<app::App>) {
    let timeout = app.config.general.shutdown_timeout;
    tracing::info!(
        clients = app.process.cancels.live(),
        "SIGTERM: draining for up to {timeout:?}"
    );
    app.process.cancels.start_draining();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
    loop {
        tick.tick().await;
        app.process.cancels.poke_idle();
        let live = app.process.cancels.live();
        if live == 0 {
            tracing::info!("all clients done");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                clients = live,
                "shutdown_timeout reached: disconnecting the rest"
            );
            return;
        }
    }
}

/// SIGHUP re-reads the configuration; a broken file is logged and changes nothing.
fn spawn_reload_on_sighup(process: Arc<app::Process>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: reload with the admin console");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if let Err(e) = reload(&process).await {
                tracing::error!("reload failed, configuration unchanged: {e}");
            }
        }
    });
}

/// Applies the configuration file again (SIGHUP or admin RELOAD).
pub async fn reload(process: &Arc<app::Process>) -> Result<(), String> {
    let (app, fresh) = process.reload()?;
    start_health_checks(&app, &fresh).await;
    Ok(())
}

/// Checks every host once (so the first clients are routed by facts, not by config order),
/// then keeps checking in the background.
async fn start_health_checks(app: &Arc<app::App>, databases: &[String]) {
    for (db, shards) in app
        .topologies
        .iter()
        .filter(|(db, _)| databases.contains(db))
    {
        let Some(opts) = app.health_options(db) else {
            tracing::warn!(database = %db, "no user with a password for health checks: roles are taken from config order");
            continue;
        };
        let opts = Arc::new(opts);
        for shard in shards {
            let mut clients: Vec<_> = shard.hosts.iter().map(|_| None).collect();
            health::check_once(shard, &mut clients, &opts).await;
            health::spawn(Arc::downgrade(shard), opts.clone(), clients);
        }
    }
}

enum Shutdown {
    Graceful,
    Fast,
}

/// SIGTERM drains, SIGINT stops at once.
async fn shutdown_signal() -> Shutdown {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => Shutdown::Graceful,
        _ = int.recv() => Shutdown::Fast,
    }
}
