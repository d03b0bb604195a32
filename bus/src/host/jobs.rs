//! Plugin tasks as jobs: `PLUGIN_OPERATION_ID_CONFIG` checked at start-up, jobs
//! started, listed, read and cancelled, their state mirrored from the jobs bucket.
//!
//! (skeleton: filled in by the host work)

use axum::Router;
use core_events::jobs::OperationIds;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{HostConfig, HostError, HostState};
use crate::registry::Registry;

pub(crate) fn routes() -> Router<HostState> {
    Router::new()
}

/// Waits (up to `config.plugin_wait`) for the plugins named in
/// `PLUGIN_OPERATION_ID_CONFIG` to register, then checks the configuration
/// against their manifests.
///
/// # Errors
///
/// [`HostError::OperationIds`] with every problem (Pagoda's messages).
pub async fn operation_ids(
    registry: &Registry,
    config: &HostConfig,
) -> Result<OperationIds, HostError> {
    let _ = (registry, config);
    Ok(OperationIds::default())
}

/// Background work of the jobs part (state mirror, timeouts) until `shutdown`.
pub(crate) fn spawn_background(
    state: HostState,
    shutdown: CancellationToken,
) -> Vec<JoinHandle<()>> {
    let _ = (state, shutdown);
    Vec::new()
}
