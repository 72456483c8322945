//! Shutdown: SIGINT or SIGTERM, observed once and fanned out.

use tokio::sync::watch;

/// Resolves on the first SIGINT or SIGTERM; if `notify` is given, also tells its
/// receivers (other tasks of the process) to stop.
pub async fn signal_then_notify(notify: Option<watch::Sender<bool>>) {
    wait_for_signal().await;
    tracing::info!("shutdown signal received");
    if let Some(notify) = notify {
        let _ = notify.send(true);
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM; only Ctrl-C stops");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Resolves when the watch flips to true (or its sender is gone).
pub async fn stopped(mut receiver: watch::Receiver<bool>) {
    let _ = receiver.wait_for(|stop| *stop).await;
}
