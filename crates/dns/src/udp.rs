//! UDP in batches: one blocking thread per `SO_REUSEPORT` socket receives up to [`BATCH`]
//! datagrams with one `recvmmsg`, answers what the zone owns in place, and sends the replies
//! with one `sendmmsg`; forwarded questions go to the async runtime and are sent from there.
//! Two system calls per batch instead of two per query: under load that is most of a query's
//! cost (knot and unbound batch the same way).

use nix::libc;
use std::mem::zeroed;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;

pub const BATCH: usize = 64;
/// Larger than any query flatnet accepts (EDNS payloads are clamped to 1232; queries are small).
const BUF: usize = 4096;

/// One datagram's source, as the kernel gave it.
#[derive(Clone, Copy)]
pub struct Peer {
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl Peer {
    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        use nix::sys::socket::SockaddrLike;
        // SAFETY: `addr` holds `len` bytes the kernel wrote.
        unsafe {
            nix::sys::socket::SockaddrStorage::from_raw(
                std::ptr::addr_of!(self.addr).cast(),
                Some(self.len),
            )
        }
        .and_then(|s| {
            s.as_sockaddr_in()
                .map(|a| std::net::SocketAddr::V4((*a).into()))
                .or_else(|| {
                    s.as_sockaddr_in6()
                        .map(|a| std::net::SocketAddr::V6((*a).into()))
                })
        })
    }
}

pub struct Batch {
    bufs: Vec<[u8; BUF]>,
    peers: Vec<Peer>,
    lens: Vec<usize>,
    count: usize,
}

impl Default for Batch {
    fn default() -> Batch {
        Batch {
            bufs: vec![[0; BUF]; BATCH],
            // SAFETY: an all-zero sockaddr_storage is a valid (unspecified) address.
            peers: vec![
                Peer {
                    addr: unsafe { zeroed() },
                    len: 0
                };
                BATCH
            ],
            lens: vec![0; BATCH],
            count: 0,
        }
    }
}

impl Batch {
    /// Blocks for at least one datagram, then takes what else is queued (up to [`BATCH`]).
    pub fn receive(&mut self, sock: &UdpSocket) -> std::io::Result<()> {
        // SAFETY: every pointer handed to the kernel points into `self`'s buffers, which outlive
        // the call; lengths are the buffers' own.
        unsafe {
            let mut iov: [libc::iovec; BATCH] = zeroed();
            let mut hdrs: [libc::mmsghdr; BATCH] = zeroed();
            for i in 0..BATCH {
                iov[i] = libc::iovec {
                    iov_base: self.bufs[i].as_mut_ptr().cast(),
                    iov_len: BUF,
                };
                hdrs[i].msg_hdr.msg_name = std::ptr::addr_of_mut!(self.peers[i].addr).cast();
                hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
                hdrs[i].msg_hdr.msg_iov = &mut iov[i];
                hdrs[i].msg_hdr.msg_iovlen = 1;
            }
            let n = libc::recvmmsg(
                sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            );
            if n < 0 {
                self.count = 0;
                return Err(std::io::Error::last_os_error());
            }
            self.count = n as usize;
            for (i, h) in hdrs.iter().take(self.count).enumerate() {
                self.peers[i].len = h.msg_hdr.msg_namelen;
                // A datagram larger than the buffer is no query of ours: seen as empty.
                let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
                self.lens[i] = if truncated { 0 } else { h.msg_len as usize };
            }
        }
        Ok(())
    }

    /// The received datagrams with their sources.
    pub fn packets(&self) -> impl Iterator<Item = (&[u8], Peer)> {
        (0..self.count).map(|i| (&self.bufs[i][..self.lens[i]], self.peers[i]))
    }
}

/// Sends `replies` (bytes, destination) with as few `sendmmsg` calls as the kernel allows.
pub fn send_all(sock: &UdpSocket, replies: &mut [(Vec<u8>, Peer)]) {
    let mut done = 0;
    let total = replies.len();
    while done < total {
        let chunk = &mut replies[done..(done + BATCH).min(total)];
        // SAFETY: as in `receive`: pointers into `chunk`, alive for the call.
        let sent = unsafe {
            let mut iov: [libc::iovec; BATCH] = zeroed();
            let mut hdrs: [libc::mmsghdr; BATCH] = zeroed();
            for (i, (bytes, peer)) in chunk.iter_mut().enumerate() {
                iov[i] = libc::iovec {
                    iov_base: bytes.as_mut_ptr().cast(),
                    iov_len: bytes.len(),
                };
                hdrs[i].msg_hdr.msg_name = std::ptr::addr_of_mut!(peer.addr).cast();
                hdrs[i].msg_hdr.msg_namelen = peer.len;
                hdrs[i].msg_hdr.msg_iov = &mut iov[i];
                hdrs[i].msg_hdr.msg_iovlen = 1;
            }
            libc::sendmmsg(sock.as_raw_fd(), hdrs.as_mut_ptr(), chunk.len() as u32, 0)
        };
        if sent <= 0 {
            // The first datagram cannot go (no route, a full buffer): skip it, as a lost
            // datagram; the client retries.
            done += 1;
        } else {
            done += sent as usize;
        }
    }
}
