//! Requests the control socket hands to the daemon's loop (`meshctl
//! network create|rm`, `meshctl key renew`), each with the channel its
//! answer comes back on.

use tokio::sync::{mpsc, oneshot};

use crate::status::NetworkRow;

/// What `meshctl` asks of the daemon.
pub enum Request {
    Network(NetworkRequest),
    /// A new WireGuard key pair for this node; the answer is its public key.
    RenewKey {
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// A consistency check round (`meshctl check`); the answer is its name.
    Check {
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// What `meshctl network` asks of the daemon.
pub enum NetworkRequest {
    Create {
        name: String,
        subnet: Option<String>,
        reply: oneshot::Sender<Result<NetworkRow, String>>,
    },
    Remove {
        name: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// The channel: the control socket sends, the daemon receives.
pub fn channel() -> (mpsc::Sender<Request>, mpsc::Receiver<Request>) {
    mpsc::channel(8)
}
