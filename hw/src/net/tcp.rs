//! TCP transport: length-prefixed frames read into shared buffers, written with vectored writes.

use super::{count_copy, Frame, FrameRecv, FrameSend, NetError};
use bytes::{Buf, BytesMut};
use chainlog_core::wire::{Encoded, FrameHeader, FRAME_HEADER_LEN};
use std::io::IoSlice;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Receive buffer size: one read syscall picks up many small frames; a frame's body is then a
/// zero-copy slice of this buffer (the allocation lives until every slice of it is dropped).
pub const READ_BUFFER_BYTES: usize = 256 * 1024;
/// Most iovecs handed to one `writev` (Linux IOV_MAX is 1024).
const IOVECS_MAX: usize = 1024;

/// Reads frames from any byte stream (a TCP half, a Unix socket, a test pipe).
pub struct StreamReader<R> {
    r: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin + Send> StreamReader<R> {
    pub fn new(r: R) -> Self {
        StreamReader {
            r,
            buf: BytesMut::with_capacity(READ_BUFFER_BYTES),
        }
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
            count_copy(have);
            self.buf = fresh;
        }
    }

    async fn fill(&mut self, need: usize) -> Result<bool, NetError> {
        while self.buf.len() < need {
            self.make_room(need);
            let n = self.r.read_buf(&mut self.buf).await?;
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
}

impl<R: AsyncRead + Unpin + Send> FrameRecv for StreamReader<R> {
    async fn recv(&mut self) -> Result<Option<Frame>, NetError> {
        if !self.fill(FRAME_HEADER_LEN).await? {
            return Ok(None);
        }
        let mut hb = [0u8; FRAME_HEADER_LEN];
        hb.copy_from_slice(&self.buf[..FRAME_HEADER_LEN]);
        let header = FrameHeader::decode(&hb)?;
        let total = FRAME_HEADER_LEN + header.body_len as usize;
        if !self.fill(total).await? {
            return Err(NetError::Truncated);
        }
        self.buf.advance(FRAME_HEADER_LEN);
        let body = self.buf.split_to(header.body_len as usize).freeze();
        Ok(Some(Frame { header, body }))
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

/// A TCP connection split into a frame reader and a frame writer.
pub fn split(
    stream: tokio::net::TcpStream,
) -> (
    StreamReader<tokio::net::tcp::OwnedReadHalf>,
    StreamWriter<tokio::net::tcp::OwnedWriteHalf>,
) {
    // Small frames (acks, commits) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    (StreamReader::new(r), StreamWriter::new(w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use chainlog_core::wire::{encode_frame, Kind};

    #[tokio::test]
    async fn frames_cross_a_pipe_intact() {
        let (a, b) = tokio::io::duplex(1000);
        let mut w = StreamWriter::new(a);
        let mut r = StreamReader::new(b);
        let big = Bytes::from(vec![7u8; 700_000]);
        let frames: Vec<Encoded> = (0..50u64)
            .map(|i| {
                let chunk = if i == 25 { big.clone() } else { Bytes::from(vec![i as u8; i as usize]) };
                encode_frame(Kind::Status, i, vec![chunk], |b| bytes::BufMut::put_u32_le(b, i as u32))
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
}
