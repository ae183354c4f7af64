//! TCP transport: length-prefixed frames read into shared buffers, written with vectored writes.

use super::{count_copy, Frame, FrameRecv, FrameSend, NetError};
use bytes::{Buf, BufMut, BytesMut};
use chainlog_core::record::{BatchHeader, HEADER_LEN};
use chainlog_core::wire::{
    peer_fixed_len, Encoded, FrameHeader, Kind, FRAME_HEADER_LEN, PEER_FIXED_LEN_MIN,
};
use std::io::IoSlice;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Receive buffer size: one read syscall picks up many small frames; a frame's body is then a
/// zero-copy slice of this buffer (the allocation lives until every slice of it is dropped).
pub const READ_BUFFER_BYTES: usize = 256 * 1024;
/// How far a peer link reads ahead of what it needs, counted from the start of a frame: its
/// header, the smallest fixed part of a batch-carrying peer message and one batch header. No
/// record payload of this frame or of the next one can lie inside that span (a batch follows
/// its frame's header and fixed part, and starts with its 80-byte header, which goes through
/// the shared buffer anyway), so the bytes read ahead are headers and control fields, never
/// payload, and every batch body is still read straight into a buffer of its own. It saves
/// reads: an ack arrives in one read (it is shorter than the span), a forwarded batch in two.
const PEER_READ_AHEAD_BYTES: usize = FRAME_HEADER_LEN + PEER_FIXED_LEN_MIN + HEADER_LEN;
/// Most iovecs handed to one `writev` (Linux IOV_MAX is 1024).
const IOVECS_MAX: usize = 1024;

/// Which frames get a buffer of their own, and how it is laid out.
///
/// A batch the head will restamp must be the only handle on its memory (so the core can mutate
/// the header in place instead of copying the batch), and an O_DIRECT write needs it page
/// aligned and zero-padded to a page. Such frames are read straight from the socket into their
/// own buffer; everything else is sliced out of the shared read buffer.
#[derive(Clone, Copy, Debug, Default)]
pub struct BodyPolicy {
    /// Frame kind whose bodies get their own buffer (`None`: every frame shares).
    pub dedicated_kind: Option<u16>,
    /// Align dedicated bodies to this many bytes and zero-pad their length to a multiple of it
    /// (the padding is part of the returned `Bytes`; the frame header keeps the real length).
    pub align: Option<usize>,
    /// Read each batch of a batch-carrying peer frame into a buffer of its own (aligned and
    /// padded per `align`), so a replica writes it with O_DIRECT as received, without a copy.
    pub split_peer_batches: bool,
}

/// Reads frames from any byte stream (a TCP half, a Unix socket, a test pipe).
pub struct StreamReader<R> {
    r: R,
    buf: BytesMut,
    policy: BodyPolicy,
    /// Payload bytes this reader copied (also added to the process-wide count).
    copied_bytes: u64,
}

/// A fresh, uniquely owned buffer whose first byte sits at an `align` boundary, with room for
/// `cap` bytes. Made from a plain allocation with the unaligned prefix skipped, so it stays an
/// ordinary `BytesMut` (and the `Bytes` frozen from it can be turned back into one).
fn aligned_buffer(cap: usize, align: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(cap + align);
    let skip = b.as_ptr().align_offset(align).min(align);
    b.resize(skip, 0);
    b.advance(skip);
    debug_assert!(b.capacity() >= cap);
    b
}

impl<R: AsyncRead + Unpin + Send> StreamReader<R> {
    pub fn new(r: R) -> Self {
        Self::with_policy(r, BodyPolicy::default())
    }

    pub fn with_policy(r: R, policy: BodyPolicy) -> Self {
        StreamReader {
            r,
            buf: BytesMut::with_capacity(READ_BUFFER_BYTES),
            policy,
            copied_bytes: 0,
        }
    }

    /// Changes which frames get their own buffer. Going from a dedicated policy to a shared one
    /// is always safe (a dedicated reader never reads ahead of the current frame).
    pub fn set_policy(&mut self, policy: BodyPolicy) {
        self.policy = policy;
    }

    /// Payload bytes this reader had to copy in user space.
    pub fn copied_bytes(&self) -> u64 {
        self.copied_bytes
    }

    fn copied(&mut self, n: usize) {
        self.copied_bytes += n as u64;
        count_copy(n);
    }

    /// Makes room for `need` contiguous bytes and at least a useful read's worth of spare space.
    /// When the current buffer cannot give that, the part of a frame already received moves to a
    /// fresh buffer; that copy is counted (it is at most one partial frame per buffer).
    fn make_room(&mut self, need: usize) {
        const SPARE_MIN: usize = 4096;
        let want = need.max(self.buf.len() + SPARE_MIN);
        if self.buf.capacity() < want {
            let have = self.buf.len();
            let mut fresh = BytesMut::with_capacity(want.max(READ_BUFFER_BYTES));
            fresh.extend_from_slice(&self.buf);
            self.copied(have);
            self.buf = fresh;
        }
    }

    /// Reads until the shared buffer holds `need` bytes. `exact` reads no further than that (no
    /// read-ahead, so the body that follows can go straight into a buffer of its own); otherwise
    /// each read takes whatever the socket has, up to the buffer's free space.
    async fn fill(&mut self, need: usize, exact: bool) -> Result<bool, NetError> {
        while self.buf.len() < need {
            let want = need - self.buf.len();
            if !exact || self.buf.capacity() - self.buf.len() < want {
                self.make_room(need);
            }
            let n = if exact {
                self.r.read_buf(&mut (&mut self.buf).limit(want)).await?
            } else {
                self.r.read_buf(&mut self.buf).await?
            };
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(false)
                } else {
                    Err(NetError::Truncated)
                };
            }
        }
        Ok(true)
    }

    /// Reads a dedicated body of `len` bytes. Whatever the shared buffer already holds of it is
    /// moved (counted as a copy; with an exact header read that is nothing). The read also asks
    /// for the next frame's header, so a busy connection costs one read per frame; those few
    /// header bytes are handed back to the shared buffer.
    async fn read_dedicated(&mut self, len: usize) -> Result<BytesMut, NetError> {
        let align = self.policy.align.unwrap_or(1).max(1);
        let padded = len.div_ceil(align) * align;
        let cap = padded.max(len + FRAME_HEADER_LEN);
        let mut body = if align > 1 {
            aligned_buffer(cap, align)
        } else {
            BytesMut::with_capacity(cap)
        };
        let already = self.buf.len().min(len);
        if already > 0 {
            body.extend_from_slice(&self.buf[..already]);
            self.buf.advance(already);
            self.copied(already);
        }
        while body.len() < len {
            let want = len + FRAME_HEADER_LEN - body.len();
            let n = self.r.read_buf(&mut (&mut body).limit(want)).await?;
            if n == 0 {
                return Err(NetError::Truncated);
            }
        }
        if body.len() > len {
            // Bytes of the next frame's header: back to the (now empty) shared buffer.
            debug_assert!(self.buf.is_empty());
            self.buf.extend_from_slice(&body[len..]);
            body.truncate(len);
        }
        if padded > len {
            body.resize(padded, 0);
        }
        Ok(body)
    }
}

impl<R: AsyncRead + Unpin + Send> FrameRecv for StreamReader<R> {
    async fn recv(&mut self) -> Result<Option<Frame>, NetError> {
        let dedicated = self.policy.dedicated_kind;
        let exact = dedicated.is_some() || self.policy.split_peer_batches;
        let have_header = if self.reads_ahead() {
            self.fill_ahead(FRAME_HEADER_LEN, PEER_READ_AHEAD_BYTES)
                .await?
        } else {
            self.fill(FRAME_HEADER_LEN, exact).await?
        };
        if !have_header {
            return Ok(None);
        }
        let mut hb = [0u8; FRAME_HEADER_LEN];
        hb.copy_from_slice(&self.buf[..FRAME_HEADER_LEN]);
        let header = FrameHeader::decode(&hb)?;
        let len = header.body_len as usize;
        if exact {
            self.buf.advance(FRAME_HEADER_LEN);
            if dedicated == Some(header.kind) {
                let body = self.read_dedicated(len).await?.freeze();
                return Ok(Some(Frame {
                    header,
                    body,
                    batches: Vec::new(),
                }));
            }
            if self.policy.split_peer_batches && header.kind == Kind::Peer as u16 {
                return self.read_split_peer(header).await.map(Some);
            }
            // Small control frames: read exactly, still without read-ahead.
            let body = self.read_shared(len, 0).await?;
            return Ok(Some(Frame {
                header,
                body,
                batches: Vec::new(),
            }));
        }
        let total = FRAME_HEADER_LEN + len;
        if !self.fill(total, false).await? {
            return Err(NetError::Truncated);
        }
        self.buf.advance(FRAME_HEADER_LEN);
        let body = self.buf.split_to(len).freeze();
        Ok(Some(Frame {
            header,
            body,
            batches: Vec::new(),
        }))
    }
}

impl<R: AsyncRead + Unpin + Send> StreamReader<R> {
    /// A peer frame whose batches each get a buffer of their own: the fixed part is read
    /// exactly, then every batch header, then the rest of that batch straight into an aligned,
    /// padded buffer. Only the 80-byte batch headers pass through the shared buffer.
    async fn read_split_peer(&mut self, header: FrameHeader) -> Result<Frame, NetError> {
        let len = header.body_len as usize;
        let first = len.min(PEER_FIXED_LEN_MIN);
        let ahead = if self.reads_ahead() {
            PEER_READ_AHEAD_BYTES
        } else {
            0
        };
        let mut fixed = self.read_shared(first, 0).await?;
        let Some(fixed_len) = fixed.first().and_then(|&sub| peer_fixed_len(sub)) else {
            // No batches in this message: the rest of the body, and the start of the next frame
            // if it has arrived.
            let rest = self.read_shared(len - first, ahead).await?;
            let mut whole = BytesMut::with_capacity(len);
            whole.extend_from_slice(&fixed);
            whole.extend_from_slice(&rest);
            return Ok(Frame {
                header,
                body: whole.freeze(),
                batches: Vec::new(),
            });
        };
        if fixed_len > len {
            return Err(NetError::BadFrame(chainlog_core::Error::Malformed(
                "peer frame shorter than its fixed part".into(),
            )));
        }
        if fixed_len > first {
            // With the first batch's header, which goes through the shared buffer anyway.
            let header_ahead = if ahead > 0 {
                HEADER_LEN.min(len - fixed_len)
            } else {
                0
            };
            let more = self.read_shared(fixed_len - first, header_ahead).await?;
            let mut f = BytesMut::with_capacity(fixed_len);
            f.extend_from_slice(&fixed);
            f.extend_from_slice(&more);
            fixed = f.freeze();
        }
        let align = self.policy.align.unwrap_or(1).max(1);
        let mut left = len - fixed_len;
        let mut batches = Vec::new();
        while left > 0 {
            if left < HEADER_LEN {
                return Err(NetError::BadFrame(chainlog_core::Error::Malformed(
                    "peer frame ends inside a batch header".into(),
                )));
            }
            // The batch's length is known from its first bytes: with those read ahead, the
            // rest of the header and the body arrive in one read into the batch's own buffer
            // (a forwarded batch in two reads, not three). The header is decoded, CRC and
            // all, once whole; until then its length only sizes a buffer bounded by the frame.
            if self.buf.len() < chainlog_core::record::LEN_KNOWN_AT
                && !self.fill(HEADER_LEN, true).await?
            {
                return Err(NetError::Truncated);
            }
            let Some(blen) = chainlog_core::record::claimed_batch_len(&self.buf) else {
                return Err(NetError::Truncated);
            };
            if blen > left {
                return Err(NetError::BadFrame(chainlog_core::Error::Malformed(
                    "batch runs past its peer frame".into(),
                )));
            }
            // The frame's last batch also asks for the next frame's first bytes; any other, for
            // the next batch's header (header bytes only, either way).
            let tail_ahead = if blen == left {
                ahead
            } else {
                HEADER_LEN.min(left - blen)
            };
            let padded = blen.div_ceil(align) * align;
            let cap = padded.max(blen + tail_ahead);
            let mut b = if align > 1 {
                aligned_buffer(cap, align)
            } else {
                BytesMut::with_capacity(cap)
            };
            // Only header bytes are pending here (see PEER_READ_AHEAD_BYTES).
            assert!(
                self.buf.len() <= HEADER_LEN,
                "record payload pending in the shared buffer"
            );
            b.extend_from_slice(&self.buf);
            self.buf.clear();
            self.read_into(&mut b, HEADER_LEN, blen + tail_ahead)
                .await?;
            // (Its length field is the one `blen` came from.)
            BatchHeader::decode(&b[..HEADER_LEN])?;
            self.read_into(&mut b, blen, blen + tail_ahead).await?;
            if b.len() > blen {
                // The next batch's header, or the next frame's first bytes: back to the shared
                // buffer, which was emptied into this batch (else the stream would reorder).
                assert!(self.buf.is_empty(), "bytes pending behind a batch body");
                self.keep_read_ahead(&b[blen..]);
                b.truncate(blen);
            }
            if padded > blen {
                b.resize(padded, 0);
            }
            batches.push(b.freeze());
            left -= blen;
        }
        Ok(Frame {
            header,
            body: fixed,
            batches,
        })
    }

    /// Reads straight from the stream into `b` until it holds at least `need` bytes, taking at
    /// most `upto` in all.
    async fn read_into(
        &mut self,
        b: &mut BytesMut,
        need: usize,
        upto: usize,
    ) -> Result<(), NetError> {
        while b.len() < need {
            let want = upto - b.len();
            let n = self.r.read_buf(&mut (&mut *b).limit(want)).await?;
            if n == 0 {
                return Err(NetError::Truncated);
            }
        }
        Ok(())
    }

    /// `len` bytes of a frame's non-batch part through the shared buffer, reading at most
    /// `ahead` bytes past them (0: exactly).
    async fn read_shared(&mut self, len: usize, ahead: usize) -> Result<bytes::Bytes, NetError> {
        let filled = if ahead == 0 {
            self.fill(len, true).await?
        } else {
            self.fill_ahead(len, len + ahead).await?
        };
        if !filled {
            return Err(NetError::Truncated);
        }
        Ok(self.buf.split_to(len).freeze())
    }

    /// Whether this reader reads ahead (peer links; see [`PEER_READ_AHEAD_BYTES`]).
    fn reads_ahead(&self) -> bool {
        self.policy.split_peer_batches && self.policy.dedicated_kind.is_none()
    }

    /// Reads until the shared buffer holds `need` bytes, taking at most `upto` (counted from the
    /// buffer's start) in all. Only for spans that hold no record payload: the bytes pending when
    /// the buffer must be replaced are moved without being counted as copies.
    async fn fill_ahead(&mut self, need: usize, upto: usize) -> Result<bool, NetError> {
        debug_assert!(upto >= need);
        while self.buf.len() < need {
            let want = upto - self.buf.len();
            self.reserve_uncounted(want);
            let n = self.r.read_buf(&mut (&mut self.buf).limit(want)).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(false)
                } else {
                    Err(NetError::Truncated)
                };
            }
        }
        Ok(true)
    }

    /// Puts bytes read ahead past a batch (the next frame's first few) into the shared buffer.
    fn keep_read_ahead(&mut self, b: &[u8]) {
        self.reserve_uncounted(b.len());
        self.buf.extend_from_slice(b);
    }

    /// Makes room for `n` more bytes in the shared buffer, moving what it holds to a fresh one
    /// if needed. Not a payload copy: only headers and control fields are pending here (see
    /// [`PEER_READ_AHEAD_BYTES`]).
    fn reserve_uncounted(&mut self, n: usize) {
        if self.buf.capacity() - self.buf.len() < n {
            let mut fresh = BytesMut::with_capacity(READ_BUFFER_BYTES.max(self.buf.len() + n));
            fresh.extend_from_slice(&self.buf);
            self.buf = fresh;
        }
    }
}

/// Writes frames to any byte stream with vectored writes: the frame heads and the batch chunks
/// go to the kernel straight from their buffers.
pub struct StreamWriter<W> {
    w: W,
}

impl<W: AsyncWrite + Unpin + Send> StreamWriter<W> {
    pub fn new(w: W) -> Self {
        StreamWriter { w }
    }

    pub fn into_inner(self) -> W {
        self.w
    }
}

impl<W: AsyncWrite + Unpin + Send> FrameSend for StreamWriter<W> {
    async fn send(&mut self, frames: &[Encoded]) -> Result<(), NetError> {
        // Flatten to (chunk, already-written) pairs and writev until all are out.
        let mut parts: Vec<&[u8]> = Vec::with_capacity(frames.len() * 2);
        for f in frames {
            parts.push(&f.head);
            for c in &f.chunks {
                if !c.is_empty() {
                    parts.push(c);
                }
            }
        }
        let mut idx = 0usize;
        let mut off = 0usize;
        while idx < parts.len() {
            let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity((parts.len() - idx).min(IOVECS_MAX));
            iov.push(IoSlice::new(&parts[idx][off..]));
            for p in parts[idx + 1..].iter().take(IOVECS_MAX - 1) {
                iov.push(IoSlice::new(p));
            }
            let mut n = self.w.write_vectored(&iov).await?;
            if n == 0 {
                return Err(NetError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            while n > 0 && idx < parts.len() {
                let left = parts[idx].len() - off;
                if n >= left {
                    n -= left;
                    idx += 1;
                    off = 0;
                } else {
                    off += n;
                    n = 0;
                }
            }
        }
        self.w.flush().await?;
        Ok(())
    }
}

/// Socket options every chainlog TCP connection gets (tokio's or std's): no Nagle (small
/// frames such as acks and commits must not wait) and send/receive buffers of
/// `limits::SOCKET_BUFFER_BYTES`. Failures only cost speed, so they are logged, not returned.
pub fn tune(stream: &impl std::os::fd::AsFd) {
    let s = socket2::SockRef::from(stream);
    if let Err(e) = s.set_tcp_nodelay(true) {
        tracing::debug!("TCP_NODELAY: {e}");
    }
    let bytes = chainlog_core::limits::SOCKET_BUFFER_BYTES;
    if let Err(e) = s
        .set_send_buffer_size(bytes)
        .and_then(|()| s.set_recv_buffer_size(bytes))
    {
        tracing::debug!("socket buffer sizes: {e}");
    }
}

/// A TCP connection split into a frame reader (with `policy`) and a frame writer.
pub fn split_with(
    stream: tokio::net::TcpStream,
    policy: BodyPolicy,
) -> (
    StreamReader<tokio::net::tcp::OwnedReadHalf>,
    StreamWriter<tokio::net::tcp::OwnedWriteHalf>,
) {
    tune(&stream);
    let (r, w) = stream.into_split();
    (StreamReader::with_policy(r, policy), StreamWriter::new(w))
}

/// A TCP connection split into a frame reader and a frame writer.
pub fn split(
    stream: tokio::net::TcpStream,
) -> (
    StreamReader<tokio::net::tcp::OwnedReadHalf>,
    StreamWriter<tokio::net::tcp::OwnedWriteHalf>,
) {
    tune(&stream);
    let (r, w) = stream.into_split();
    (StreamReader::new(r), StreamWriter::new(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Bytes;
    use chainlog_core::wire::encode_frame;

    /// Both ends of a split connection ask for buffers the size of the largest frame (as far
    /// as the kernel's maximum allows), instead of autotuning from a few KiB.
    #[tokio::test]
    async fn split_connections_get_whole_frame_socket_buffers() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        let (c, (s, _)) = (c.unwrap(), s.unwrap());
        let untuned = socket2::SockRef::from(&c).recv_buffer_size().unwrap();
        let kernel_max = |f: &str| -> usize {
            std::fs::read_to_string(f)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let want_recv = chainlog_core::limits::SOCKET_BUFFER_BYTES
            .min(kernel_max("/proc/sys/net/core/rmem_max"));
        let want_send = chainlog_core::limits::SOCKET_BUFFER_BYTES
            .min(kernel_max("/proc/sys/net/core/wmem_max"));
        tune(&c);
        let (r, w) = split(s);
        for sock in [
            socket2::SockRef::from(&c),
            socket2::SockRef::from(r.r.as_ref()),
        ] {
            // Linux reports twice what was granted (it counts its bookkeeping).
            let recv = sock.recv_buffer_size().unwrap();
            let send = sock.send_buffer_size().unwrap();
            assert!(
                recv >= want_recv && recv >= untuned,
                "recv {recv}, want {want_recv}"
            );
            assert!(send >= want_send, "send {send}, want {want_send}");
        }
        drop(w);
    }

    #[tokio::test]
    async fn frames_cross_a_pipe_intact() {
        let (a, b) = tokio::io::duplex(1000);
        let mut w = StreamWriter::new(a);
        let mut r = StreamReader::new(b);
        let big = Bytes::from(vec![7u8; 700_000]);
        let frames: Vec<Encoded> = (0..50u64)
            .map(|i| {
                let chunk = if i == 25 {
                    big.clone()
                } else {
                    Bytes::from(vec![i as u8; i as usize])
                };
                encode_frame(Kind::Status, i, vec![chunk], |b| {
                    bytes::BufMut::put_u32_le(b, i as u32)
                })
            })
            .collect();
        let expect = frames.clone();
        let writer = tokio::spawn(async move {
            w.send(&frames).await.expect("send");
        });
        for (i, f) in expect.iter().enumerate() {
            let got = r.recv().await.expect("recv").expect("frame");
            assert_eq!(got.header.request_id, i as u64);
            assert_eq!(&got.body[..], &f.to_vec()[FRAME_HEADER_LEN..]);
        }
        writer.await.expect("join");
        assert!(r.recv().await.expect("eof").is_none());
    }

    #[tokio::test]
    async fn dedicated_bodies_are_aligned_unique_and_padded() {
        let (a, b) = tokio::io::duplex(3000);
        let mut w = StreamWriter::new(a);
        let policy = BodyPolicy {
            dedicated_kind: Some(Kind::Append as u16),
            align: Some(4096),
            split_peer_batches: false,
        };
        let mut r = StreamReader::with_policy(b, policy);
        let frames: Vec<Encoded> = (0..40u64)
            .map(|i| {
                let kind = if i % 3 == 0 {
                    Kind::Status
                } else {
                    Kind::Append
                };
                let chunk = Bytes::from(vec![i as u8 + 1; 100 + (i as usize * 997) % 9000]);
                encode_frame(kind, i, vec![chunk], |_| {})
            })
            .collect();
        let expect = frames.clone();
        let writer = tokio::spawn(async move {
            for f in frames.chunks(7) {
                w.send(f).await.expect("send");
            }
        });
        for (i, f) in expect.iter().enumerate() {
            let got = r.recv().await.expect("recv").expect("frame");
            let want = &f.to_vec()[FRAME_HEADER_LEN..];
            assert_eq!(got.header.request_id, i as u64);
            if got.header.kind == Kind::Append as u16 {
                assert_eq!(got.body.as_ptr() as usize % 4096, 0, "aligned");
                assert_eq!(got.body.len() % 4096, 0, "padded");
                assert_eq!(&got.body[..want.len()], want);
                assert!(got.body[want.len()..].iter().all(|&b| b == 0));
                // Unique: the core can restamp the header in place.
                let m = got.body.try_into_mut().expect("unique buffer");
                assert_eq!(
                    m.as_ptr() as usize % 4096,
                    0,
                    "still aligned after try_into_mut"
                );
            } else {
                assert_eq!(&got.body[..], want);
            }
        }
        writer.await.expect("join");
        assert!(r.recv().await.expect("eof").is_none());
        assert_eq!(r.copied_bytes(), 0, "no payload copies");
    }

    /// A received peer frame: each batch in a page-aligned buffer of its own, and the message
    /// the one sent (batches compared without their padding).
    fn check_peer_frame(f: Frame, want: &chainlog_core::wire::PeerMessage) {
        use chainlog_core::wire::PeerMessage;
        for b in &f.batches {
            assert_eq!(
                b.as_ptr() as usize % 4096,
                0,
                "batch in a buffer of its own"
            );
            assert_eq!(b.len() % 4096, 0);
        }
        let got = if f.batches.is_empty() {
            PeerMessage::decode(f.body).expect("decode")
        } else {
            PeerMessage::decode_split(f.body, f.batches).expect("decode_split")
        };
        match (&got, want) {
            (PeerMessage::Append { batches: g, .. }, PeerMessage::Append { batches: w, .. })
            | (
                PeerMessage::FetchReply { batches: g, .. },
                PeerMessage::FetchReply { batches: w, .. },
            ) => {
                assert_eq!(g.len(), w.len());
                for (g, w) in g.iter().zip(w) {
                    assert_eq!(&g[..w.len()], &w[..]);
                }
            }
            _ => assert_eq!(&got, want),
        }
    }

    #[tokio::test]
    async fn split_peer_batches_each_get_an_aligned_buffer() {
        use chainlog_core::record::build;
        use chainlog_core::wire::PeerMessage;
        use chainlog_core::{Epoch, LogId, Offset};
        let log = LogId(9);
        let b1 = build(log, Offset(0), Epoch(1), &[b"one", b"two"]).expect("build");
        let b2 = build(log, Offset(2), Epoch(1), &[&[7u8; 5000][..]]).expect("build");
        let msgs = vec![
            PeerMessage::Append {
                epoch: Epoch(1),
                session: 3,
                log,
                base: Offset(0),
                committed_end: Offset(0),
                batches: vec![b1, b2],
            },
            PeerMessage::Commit {
                epoch: Epoch(1),
                session: 3,
                log,
                committed_end: Offset(3),
            },
        ];
        let (a, b) = tokio::io::duplex(2000);
        let mut w = StreamWriter::new(a);
        let policy = BodyPolicy {
            dedicated_kind: None,
            align: Some(4096),
            split_peer_batches: true,
        };
        let mut r = StreamReader::with_policy(b, policy);
        let frames: Vec<Encoded> = msgs.iter().map(PeerMessage::encode).collect();
        let writer = tokio::spawn(async move { w.send(&frames).await.expect("send") });
        for m in &msgs {
            let f = r.recv().await.expect("recv").expect("frame");
            check_peer_frame(f, m);
        }
        writer.await.expect("join");
        assert_eq!(r.copied_bytes(), 0);
    }

    #[tokio::test]
    async fn oversized_length_is_refused() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = StreamReader::new(b);
        a.write_all(&[0xff; 16]).await.expect("write");
        assert!(matches!(r.recv().await, Err(NetError::BadFrame(_))));
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = StreamReader::new(b);
        let f = encode_frame(Kind::Status, 1, vec![Bytes::from_static(b"abcdef")], |_| {});
        let v = f.to_vec();
        a.write_all(&v[..v.len() - 2]).await.expect("write");
        drop(a);
        assert!(matches!(r.recv().await, Err(NetError::Truncated)));
    }

    /// A byte source that counts its reads and hands out at most `chunk` bytes per read, like a
    /// socket whose bytes have arrived (`chunk` large) or dribble in (`chunk` 1).
    struct Source {
        data: Vec<u8>,
        at: usize,
        chunk: usize,
        reads: usize,
    }

    impl AsyncRead for Source {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let me = &mut *self;
            me.reads += 1;
            let n = (me.data.len() - me.at).min(me.chunk).min(buf.remaining());
            buf.put_slice(&me.data[me.at..me.at + n]);
            me.at += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn peer_traffic() -> Vec<chainlog_core::wire::PeerMessage> {
        use chainlog_core::record::build;
        use chainlog_core::wire::PeerMessage;
        use chainlog_core::{Epoch, LogId, Offset};
        let log = LogId(9);
        let ack = |end: u64| PeerMessage::Ack {
            epoch: Epoch(1),
            session: 3,
            log,
            seq: end,
            written_end: Offset(end),
            ack_end: Offset(end),
            chain_end: Offset(end),
            committed_end: Offset(end),
            resend: false,
            trim_point: Offset(0),
        };
        let append = |base: u64, n: usize| PeerMessage::Append {
            epoch: Epoch(1),
            session: 3,
            log,
            base: Offset(base),
            committed_end: Offset(0),
            batches: (0..n as u64)
                .map(|i| {
                    build(log, Offset(base + i), Epoch(1), &[&[i as u8; 3000][..]]).expect("build")
                })
                .collect(),
        };
        vec![
            ack(1),
            append(0, 1),
            ack(2),
            PeerMessage::Commit {
                epoch: Epoch(1),
                session: 3,
                log,
                committed_end: Offset(1),
            },
            append(1, 3),
            PeerMessage::FetchReply {
                epoch: Epoch(1),
                session: 3,
                log,
                base: Offset(4),
                batches: vec![build(log, Offset(4), Epoch(1), &[b"x"]).expect("build")],
            },
            ack(5),
        ]
    }

    /// A peer link's reader (aligned, split batches, reading ahead) over `data` arriving
    /// `chunk` bytes per read.
    fn peer_reader(data: Vec<u8>, chunk: usize) -> StreamReader<Source> {
        let policy = BodyPolicy {
            dedicated_kind: None,
            align: Some(4096),
            split_peer_batches: true,
        };
        let src = Source {
            data,
            at: 0,
            chunk,
            reads: 0,
        };
        StreamReader::with_policy(src, policy)
    }

    /// Reads every message of `peer_traffic` back through a peer-policy reader; returns the
    /// reads it took.
    async fn read_peer_traffic(chunk: usize) -> usize {
        let msgs = peer_traffic();
        let mut data = Vec::new();
        for m in &msgs {
            data.extend_from_slice(&m.encode().to_vec());
        }
        let mut r = peer_reader(data, chunk);
        for m in &msgs {
            let f = r.recv().await.expect("recv").expect("frame");
            check_peer_frame(f, m);
        }
        assert!(r.recv().await.expect("eof").is_none());
        assert_eq!(r.copied_bytes(), 0, "no payload copies");
        r.r.reads
    }

    /// A forwarded batch's header is still checked whole (CRC) although its length field is
    /// used before the rest arrives, and a length past the frame is refused before any buffer
    /// is sized by it; each at every arrival pattern.
    #[tokio::test]
    async fn split_batch_headers_are_verified_and_bounded_by_their_frame() {
        use chainlog_core::record::{build, HEADER_LEN};
        use chainlog_core::wire::PeerMessage;
        use chainlog_core::{Epoch, LogId, Offset};
        let log = LogId(9);
        let m = PeerMessage::Append {
            epoch: Epoch(1),
            session: 3,
            log,
            base: Offset(0),
            committed_end: Offset(0),
            batches: vec![build(log, Offset(0), Epoch(1), &[&[7u8; 3000][..]]).expect("build")],
        };
        let good = m.encode().to_vec();
        let at = good.len() - (HEADER_LEN + 4 + 3000);
        assert_eq!(
            good[at..at + 4],
            chainlog_core::record::BATCH_MAGIC.to_le_bytes(),
            "the batch starts there"
        );
        // Unchanged, it reads back.
        let mut r = peer_reader(good.clone(), 7);
        check_peer_frame(r.recv().await.expect("recv").expect("frame"), &m);
        // The batch's log id (header bytes 24..32, under the header CRC), then its body length.
        let mut bad_crc = good.clone();
        bad_crc[at + 24] ^= 1;
        let mut too_long = good.clone();
        too_long[at + 8..at + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        for chunk in [1usize, 7, 64, 1 << 20] {
            for (data, what) in [
                (&bad_crc, "bad header CRC"),
                (&too_long, "length past the frame"),
            ] {
                let mut r = peer_reader(data.clone(), chunk);
                assert!(
                    matches!(r.recv().await, Err(NetError::BadFrame(_))),
                    "{what} at chunk {chunk}"
                );
            }
        }
    }

    #[tokio::test]
    async fn peer_links_read_ahead_only_headers_and_control_fields() {
        // All bytes there: each frame part that fits the read-ahead comes with the one before.
        // 7 frames, 5 batches: exact reads took 30 (header, fixed part, rest or batch header,
        // each batch body, and the read that finds the end); reading ahead a frame header and
        // fixed part, 16; through the first batch header (an ack in one read), 13; with each
        // batch's header finished in the read of its body and the next batch's header read
        // with the body before it, 10; since an ack carries its trim point (8 bytes more),
        // the read after the first ack no longer reaches through the next frame's fixed part,
        // 11. (On a real link acks travel alone, upstream: still one read each.)
        let reads = read_peer_traffic(1 << 20).await;
        assert!(reads <= 11, "{reads} reads");
        // Dribbled a byte at a time: same frames, same buffers.
        read_peer_traffic(1).await;
        read_peer_traffic(7).await;
    }
}
