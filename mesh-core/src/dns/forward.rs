//! Forwarding to the upstream resolvers, bounded in time.

use std::{net::SocketAddr, time::Duration};

use hickory_proto::op::Message;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest UDP answer taken from an upstream (EDNS sizes in use are
/// 1232 to 4096); a larger one fails and the client retries over TCP.
const UDP_ANSWER_MAX: usize = 4096;

pub(super) async fn forward_udp(upstream: SocketAddr, query: &[u8]) -> Result<Message, String> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    sock.connect(upstream).await.map_err(|e| e.to_string())?;
    sock.send(query).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; UDP_ANSWER_MAX];
    let n = tokio::time::timeout(UPSTREAM_TIMEOUT, sock.recv(&mut buf))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    Message::from_vec(&buf[..n]).map_err(|e| e.to_string())
}

pub(super) async fn forward_tcp(upstream: SocketAddr, query: &[u8]) -> Result<Message, String> {
    let io = async {
        let mut s = TcpStream::connect(upstream).await?;
        s.write_all(&(query.len() as u16).to_be_bytes()).await?;
        s.write_all(query).await?;
        let len = s.read_u16().await? as usize;
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(UPSTREAM_TIMEOUT, io)
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    Message::from_vec(&buf).map_err(|e| e.to_string())
}
