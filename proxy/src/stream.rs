//! A client's socket: plain TCP or TLS over it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::os::fd::AsRawFd;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl ClientStream {
    /// Ready when the socket has data (or EOF), without reading it, so an idle client holds
    /// no buffer. Polled directly rather than through `readable()`, whose future is ~170
    /// bytes that every idle client would carry; `waiting` as in `poll_read_ready_again`.
    /// TLS is always "ready": it may hold decrypted bytes the socket no longer shows.
    pub fn poll_read_ready(
        &self,
        waiting: &mut bool,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        match self {
            ClientStream::Plain(s) => poll_read_ready_again(s, waiting, cx),
            ClientStream::Tls(_) => Poll::Ready(Ok(())),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What a read that does not wait found.
pub enum Read {
    /// Bytes appended to the buffer; 0 is end of file.
    Got(usize),
    /// Nothing to read now.
    Nothing,
}

/// Reads what a socket has into `buf` without waiting.
///
/// When the read returns less than it asked for, the socket is drained for now: tokio is
/// told so (its readiness is cleared), which saves the extra `recv` returning EAGAIN that a
/// plain `try_read` would need before the task can sleep. Tokio's readiness ticks keep
/// this race-free: data arriving after the `recv` raises a new readiness event.
pub fn read_drained(tcp: &TcpStream, buf: &mut BytesMut) -> io::Result<Read> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(8192);
    }
    let fd = tcp.as_raw_fd();
    let mut got = 0usize;
    let r = tcp.try_io(Interest::READABLE, || {
        let spare = buf.spare_capacity_mut();
        let want = spare.len();
        // SAFETY: `spare` is writable memory of `want` bytes owned by `buf`; recv writes at
        // most `want` bytes into it, and only the bytes it reports are marked initialised.
        let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), want, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        // SAFETY: recv initialised the first `n` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
        got = n;
        if n > 0 && n < want {
            // Drained: report WouldBlock so tokio clears readiness; `got` carries the data.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match r {
        Ok(n) => Ok(Read::Got(n)),
        Err(_) if got > 0 => Ok(Read::Got(got)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Read::Nothing),
        Err(e) => Err(e),
    }
}

/// `poll_read_ready` for a task that waits on the same socket again and again.
///
/// `waiting` says the last poll was Pending, which registered this task's waker, and that
/// nothing has read the socket since. While tokio does not show the socket readable, that
/// registration still stands: a wake-up sets readiness before it takes the waker, and only
/// a read clears readiness. Then this answers Pending without registering again, which
/// would cost a lock and unlock of tokio's waiter list. Whoever reads the socket by other
/// means must clear `waiting`.
pub fn poll_read_ready_again(
    tcp: &TcpStream,
    waiting: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    // `try_io` runs the closure only when tokio shows the socket readable: a check of its
    // readiness that neither reads nor registers.
    if *waiting && tcp.try_io(Interest::READABLE, || Ok(())).is_err() {
        return Poll::Pending;
    }
    // A task that has used up its coop budget gets Pending before tokio looks at the
    // socket: a wake-up is deferred, but no waker is registered there.
    let budget = tokio::task::coop::has_budget_remaining();
    let ready = tcp.poll_read_ready(cx);
    *waiting = ready.is_pending() && budget;
    ready
}

/// Writes what of `buf` the socket takes now, without waiting: all of it, usually. The
/// caller awaits `send_rest` only when that is not all, so the usual send costs no future.
pub fn try_send(tcp: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    match tcp.try_write(buf) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}

/// Writes all of `buf`, waiting for the socket: the rest of what `try_send` could not.
pub async fn send_rest(tcp: &mut TcpStream, rest: &[u8]) -> io::Result<()> {
    tokio::io::AsyncWriteExt::write_all(tcp, rest).await
}

#[cfg(test)]
mod tests {
    use super::poll_read_ready_again;
    use std::future::Future;
    use std::task::Poll;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// `fut`'s output, or a panic when it is not done within 10 s. The deadline is polled
    /// first: a future that only completes because the deadline's timer woke the task
    /// (a lost wake-up) fails rather than passes.
    async fn within_deadline<T>(what: &str, fut: impl Future<Output = T>) -> T {
        tokio::select! {
            biased;
            () = tokio::time::sleep(Duration::from_secs(10)) => panic!("{what}"),
            out = fut => out,
        }
    }

    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (ours, theirs) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        (ours.expect("connect"), theirs.expect("accept").0)
    }

    /// Runs `wait` while, in the same task, the peer writes a byte after three yields (each
    /// of which has `join!` poll `wait` again while nothing has arrived); `wait`'s output,
    /// within the deadline.
    async fn wait_for_a_late_byte<T>(
        wait: impl Future<Output = T>,
        theirs: &mut tokio::net::TcpStream,
    ) -> T {
        let write = async {
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            theirs.write_all(b"x").await.expect("write");
        };
        let (out, ()) = within_deadline("the wait was never woken", async {
            tokio::join!(wait, write)
        })
        .await;
        out
    }

    /// A task that registered once, was polled again for other reasons (answered Pending
    /// without registering) and then sleeps, is woken by the first registration when data
    /// arrives. Had the later polls been wrong to skip registering, this would hang.
    #[tokio::test]
    async fn a_standing_registration_wakes_the_task() {
        let (ours, mut theirs) = pair().await;
        let mut waiting = false;
        let mut polls = 0;
        let wait = std::future::poll_fn(|cx| {
            polls += 1;
            let r = poll_read_ready_again(&ours, &mut waiting, cx);
            if r.is_pending() {
                assert!(waiting, "a Pending poll leaves the registration marked");
            }
            r
        });
        let ready = wait_for_a_late_byte(wait, &mut theirs).await;
        assert!(ready.is_ok());
        assert!(!waiting, "readiness seen: the registration is used up");
        assert!(polls >= 4, "the wait was polled {polls} times");
    }

    /// Readiness that arrived after the registration, while the task was not waiting, is
    /// reported (the registration also wakes the task; the deadline is not what ends it).
    #[tokio::test]
    async fn readiness_that_arrived_meanwhile_is_seen() {
        let (ours, mut theirs) = pair().await;
        let mut waiting = false;
        std::future::poll_fn(|cx| {
            assert!(poll_read_ready_again(&ours, &mut waiting, cx).is_pending());
            Poll::Ready(())
        })
        .await;
        assert!(waiting);
        theirs.write_all(b"x").await.expect("write");
        let ready = within_deadline(
            "readiness not seen",
            std::future::poll_fn(|cx| poll_read_ready_again(&ours, &mut waiting, cx)),
        )
        .await;
        assert!(ready.is_ok());
        assert!(!waiting);
    }

    /// A poll that finds the task's coop budget used up registers nothing, so it must not
    /// leave the socket marked as waited on: the task would then never be woken for it.
    #[tokio::test]
    async fn a_poll_without_budget_registers_nothing() {
        let (ours, mut theirs) = pair().await;
        let mut waiting = false;
        let mut first = true;
        let wait = std::future::poll_fn(|cx| {
            if first {
                first = false;
                // Use up the budget, as a long burst does.
                while let Poll::Ready(progress) = tokio::task::coop::poll_proceed(cx) {
                    progress.made_progress();
                }
                let r = poll_read_ready_again(&ours, &mut waiting, cx);
                assert!(r.is_pending());
                assert!(!waiting, "nothing was registered");
                return Poll::Pending; // tokio re-polls: it deferred a wake-up
            }
            poll_read_ready_again(&ours, &mut waiting, cx)
        });
        assert!(wait_for_a_late_byte(wait, &mut theirs).await.is_ok());
    }
}
