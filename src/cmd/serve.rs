//! `switchboard serve`: runs the [`Server`] until SIGINT or SIGTERM, then
//! shuts it down in order and exits 0.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::json;
use switchboard::keys::AdminBootstrap;
use switchboard::server::{Server, ServerError};

use crate::cli::{GlobalArgs, ServeArgs};
use crate::config;

pub fn run(global: &GlobalArgs, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let telemetry = switchboard::telemetry::init(args.log_format, args.otlp_endpoint.as_deref())?;
    let config = config::resolve_serve(global, &args)?;
    let metrics_addr = args.metrics_addr;
    let exporting = telemetry.exporting();
    let json = global.json;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("switchboard")
        .build()?;
    let code = runtime.block_on(async move {
        let stop = shutdown_signal()?;
        tokio::pin!(stop);
        // Bound first, so a busy address is refused before anything is created.
        let metrics = match metrics_addr {
            Some(addr) => Some(switchboard::metrics::listen(addr).await.map_err(|e| {
                anyhow::anyhow!("cannot serve metrics on {addr}: {e}")
            })?),
            None => None,
        };
        // A stop before the server is ready interrupts the start: the
        // projections' catch-up, its long part, commits what it has folded
        // and stops; the rest of a start is short and finishes, and the
        // server then stops as it would when ready.
        let interrupt = Arc::new(AtomicBool::new(false));
        let starting = Server::start_unless(config.clone(), interrupt.clone());
        tokio::pin!(starting);
        let started = tokio::select! {
            started = &mut starting => started,
            () = &mut stop => {
                tracing::info!("stop signal before the server is ready; interrupting the start");
                interrupt.store(true, Ordering::Relaxed);
                match starting.await {
                    Ok(server) => server.shutdown().await,
                    Err(ServerError::Interrupted) => {}
                    Err(error) => return Err(error.into()),
                }
                if json {
                    out!("{}", json!({ "ready": false, "stopped": true }));
                } else {
                    out!("switchboard stopped before it was ready");
                }
                return Ok(ExitCode::SUCCESS);
            }
        };
        let server = started?;
        let bus = match &config.nats_url {
            Some(url) => switchboard::bus::redact_url(url),
            None => "embedded".to_owned(),
        };
        let admin_key_file = match server.admin_bootstrap() {
            AdminBootstrap::Generated(path) => Some(path.display().to_string()),
            _ => None,
        };
        if json {
            out!(
                "{}",
                json!({
                    "ready": true,
                    "bus": bus,
                    "prefix": config.prefix,
                    "data_dir": config.data_dir,
                    "log_head": server.log().head(),
                    "http": server.http_addr().map(|addr| addr.to_string()),
                    "metrics": metrics.as_ref().map(|m| m.local_addr().to_string()),
                    "otlp": exporting,
                    "admin_key_file": admin_key_file,
                })
            );
        } else {
            if let Some(path) = &admin_key_file {
                out!("created the admin key; it is in {path} (mode 0600), shown nowhere else");
            }
            if let Some(addr) = server.http_addr() {
                out!("HTTP API and console on http://{addr}/");
            }
            if let Some(metrics) = &metrics {
                out!("metrics on http://{}/metrics", metrics.local_addr());
            }
            out!(
                "switchboard serving: bus {bus}, subjects {}.>, data dir {} (log head {}); Ctrl-C stops",
                config.prefix,
                config.data_dir.display(),
                server.log().head()
            );
        }
        stop.await;
        tracing::info!("shutting down");
        server.shutdown().await;
        if let Some(metrics) = metrics {
            metrics.stop().await;
        }
        if !json {
            out!("switchboard stopped");
        }
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    });
    telemetry.shutdown();
    code
}

/// SIGINT (Ctrl-C) or SIGTERM.
/// Takes SIGINT and SIGTERM over at once — before `serve` says it is ready,
/// so a signal sent as soon as it is cannot kill it uncleanly — and
/// completes when one of them arrives.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        let ctrl_c = tokio::signal::ctrl_c();
        Ok(async move {
            let _ = ctrl_c.await;
        })
    }
}
