//! Requests the control socket hands to the daemon's loop (`meshctl
//! network create|rm`), each with the channel its answer comes back on.

use tokio::sync::{mpsc, oneshot};

use crate::status::NetworkRow;

/// What `meshctl network` asks of the daemon.
pub enum Request {
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
