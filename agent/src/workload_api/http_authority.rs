//! The `:authority` layer: a byte-stream filter below h2 that lets every gRPC client stack talk to
//! a tonic server over a Unix socket.
//!
//! gRPC C-core (Python, C++, Ruby, PHP), grpc-java and grpc-swift send the percent-encoded socket
//! path as the HTTP/2 `:authority` over a Unix socket (`tmp%2Fsigil%2Fapi.sock`). h2 parses it with
//! [`http::uri::Authority`], fails, and resets the stream with `PROTOCOL_ERROR`. This layer sits
//! between the accepted socket and h2 and replaces an `:authority` that is not a valid URI
//! authority by `localhost`. Nothing else changes.
//!
//! # How
//!
//! The client-to-server byte stream is parsed as HTTP/2: the connection preface, then frames.
//! Every frame passes through unchanged except header blocks (`HEADERS` plus its `CONTINUATION`
//! frames), which are collected and decoded with [`httlib_hpack`], following the connection's HPACK
//! dynamic table (and the `SETTINGS_HEADER_TABLE_SIZE` the server announces, read from the
//! server-to-client stream, which itself passes through untouched). Our own bounds-checking scanner
//! first splits each block into its representations (RFC 7541 section 6) and rejects malformed
//! integers and strings; the decoder is then handed one well-formed representation at a time,
//! which keeps its work linear in the block size.
//!
//! - While every `:authority` seen on a connection is valid, each header block is forwarded byte for
//!   byte, so h2's decoder follows the client's own dynamic table (tonic, Go, rust-spiffe clients
//!   never pay more than the decode).
//! - From the first block that needs a change, the connection switches to *re-encoding*: each block
//!   is re-encoded as literals that never touch the dynamic table (literal without indexing, or
//!   never indexed where the client said so, RFC 7541 section 7.1.3), so h2's decoder never needs
//!   the entries it did not see, and whatever it holds from before is simply never referenced.
//!   Padding is dropped; the priority fields and `END_STREAM` are kept; the block is re-split into
//!   frames of at most 16 KiB (the smallest `SETTINGS_MAX_FRAME_SIZE` a peer can have).
//!
//! # Bounded work
//!
//! A header block above [`MAX_HEADER_BLOCK`] bytes as received, a decoded header list above
//! [`MAX_HEADER_LIST`] bytes, a dynamic table size above [`MAX_DYNAMIC_TABLE`], malformed framing
//! or malformed HPACK ends the connection (the reader returns an [`io::Error`] of kind
//! `InvalidData`); no other connection is affected.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest header block accepted, counted as received: frame headers, padding and HPACK bytes
/// of a `HEADERS` frame and its `CONTINUATION` frames together.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;

/// The largest decoded header list accepted (sum of name + value + 32 per field, RFC 7540
/// section 6.5.2), which bounds what a small block can expand to through the dynamic table.
pub const MAX_HEADER_LIST: usize = 256 * 1024;

/// The largest HPACK dynamic table a client may use, whatever the server announces.
pub const MAX_DYNAMIC_TABLE: usize = 64 * 1024;

/// The value an invalid `:authority` is replaced by.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// The HTTP/2 client connection preface (RFC 9113 section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
/// The default `SETTINGS_HEADER_TABLE_SIZE` (RFC 9113 section 6.5.2).
const DEFAULT_TABLE_SIZE: usize = 4096;
/// The largest frame payload written when re-encoding: the minimum `SETTINGS_MAX_FRAME_SIZE`.
const OUT_FRAME_MAX: usize = 16_384;

const TYPE_HEADERS: u8 = 0x1;
const TYPE_SETTINGS: u8 = 0x4;
const TYPE_PUSH_PROMISE: u8 = 0x5;
const TYPE_CONTINUATION: u8 = 0x9;

const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
/// Dynamic table size updates accepted at the start of a block (RFC 7541 section 4.2 needs two).
const MAX_SIZE_UPDATES: usize = 4;
/// Server SETTINGS payloads longer than this are not parsed (h2 sends a few dozen bytes).
const MAX_OBSERVED_SETTINGS: usize = 1024;

/// Why the layer closed a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// The connection did not start with the HTTP/2 client preface.
    #[error("connection did not start with the http/2 client preface")]
    BadPreface,
    /// A header block was larger than [`MAX_HEADER_BLOCK`] bytes.
    #[error("header block larger than {limit} bytes")]
    HeaderBlockTooLarge {
        /// The limit.
        limit: usize,
    },
    /// A decoded header list was larger than [`MAX_HEADER_LIST`] bytes.
    #[error("decoded header list larger than {limit} bytes")]
    HeaderListTooLarge {
        /// The limit.
        limit: usize,
    },
    /// A frame other than `CONTINUATION` on the same stream arrived inside a header block.
    #[error("frame of type {frame_type:#x} inside a header block")]
    InterruptedHeaderBlock {
        /// The type of the offending frame.
        frame_type: u8,
    },
    /// A `CONTINUATION` frame arrived outside a header block.
    #[error("continuation frame outside a header block")]
    UnexpectedContinuation,
    /// A client sent `PUSH_PROMISE`, which only servers may send.
    #[error("push_promise frame from a client")]
    PushPromiseFromClient,
    /// The padding or priority fields of a `HEADERS` frame do not fit in the frame.
    #[error("headers frame padding or priority does not fit in the frame")]
    BadHeadersFrame,
    /// A header block is not valid HPACK.
    #[error("invalid hpack: {0}")]
    Hpack(&'static str),
    /// A header block is not valid HPACK, as the HPACK decoder found.
    #[error("invalid hpack: {0}")]
    HpackDecode(#[from] httlib_hpack::DecoderError),
}

impl From<AuthorityError> for io::Error {
    fn from(error: AuthorityError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, error)
    }
}

/// An [`AsyncRead`] + [`AsyncWrite`] wrapper that normalises the `:authority` of every request the
/// client sends (see the [module docs](self)). Server-to-client bytes pass through untouched.
#[derive(Debug)]
pub struct NormalizeAuthority<S> {
    inner: S,
    normalizer: AuthorityNormalizer,
    /// Client bytes already processed and not yet handed to the reader.
    out: BytesMut,
    /// Set once the client broke the rules: every later read fails.
    failed: bool,
}

// === impl NormalizeAuthority ===

impl<S> NormalizeAuthority<S> {
    /// Wraps a freshly accepted connection (before any byte was read from it).
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            normalizer: AuthorityNormalizer::new(),
            out: BytesMut::new(),
            failed: false,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// How many header blocks this connection has re-encoded so far (0 while every `:authority`
    /// was valid).
    pub fn rewritten_blocks(&self) -> u64 {
        self.normalizer.rewritten_blocks()
    }
}

/// The wrapped connection's connect info, so the layer can sit in front of any tonic transport.
impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for NormalizeAuthority<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for NormalizeAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let start = buf.filled().len();
        loop {
            if this.failed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "connection closed: malformed http/2 from the client",
                )));
            }
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
            }
            if buf.filled().len() > start || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Nothing is pending: read straight into the caller's buffer, keep in place the bytes
            // that pass unchanged, and move the rest through the slow path.
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let fresh = &buf.filled()[start..];
            if fresh.is_empty() {
                return Poll::Ready(Ok(())); // end of stream
            }
            let keep = this.normalizer.pass_through_len(fresh);
            if keep == fresh.len() {
                return Poll::Ready(Ok(()));
            }
            let result = this.normalizer.feed(&fresh[keep..], &mut this.out);
            buf.set_filled(start + keep);
            if let Err(error) = result {
                this.failed = true;
                tracing::debug!(%error, "closing workload api connection");
                return Poll::Ready(Err(error.into()));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for NormalizeAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.normalizer.observe_server(&buf[..n.min(buf.len())]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for slice in bufs {
            if left == 0 {
                break;
            }
            let take = left.min(slice.len());
            this.normalizer.observe_server(&slice[..take]);
            left -= take;
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The layer without I/O: a state machine that takes the client's bytes in chunks of any size and
/// produces the bytes h2 should see. [`NormalizeAuthority`] drives it; tests and benchmarks may
/// drive it directly.
pub struct AuthorityNormalizer {
    /// Bytes of the preface matched so far, or `None` once it is complete.
    preface: Option<usize>,
    /// Payload bytes of the current pass-through frame not seen yet.
    pass_remaining: usize,
    /// A partial frame (header, or a whole header-block frame) being collected.
    pending: BytesMut,
    /// The header block being assembled, if a `HEADERS` frame without `END_HEADERS` came.
    block: Option<Block>,
    decoder: httlib_hpack::Decoder<'static>,
    /// The largest dynamic table size the client may announce.
    allowed_table_size: usize,
    /// Whether this connection re-encodes its header blocks (one-way).
    rewriting: bool,
    rewritten: u64,
    /// Scratch space reused across blocks.
    scratch: Scratch,
    server: ServerObserver,
}

impl std::fmt::Debug for AuthorityNormalizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityNormalizer")
            .field("preface_done", &self.preface.is_none())
            .field("rewriting", &self.rewriting)
            .field("rewritten", &self.rewritten)
            .field("allowed_table_size", &self.allowed_table_size)
            .finish_non_exhaustive()
    }
}

/// A header block being assembled from a `HEADERS` frame and its `CONTINUATION` frames.
#[derive(Debug)]
struct Block {
    stream_id: u32,
    /// `END_STREAM` and `PRIORITY` of the `HEADERS` frame.
    flags: u8,
    priority: Option<[u8; 5]>,
    /// The HPACK fragments, concatenated.
    fragment: Vec<u8>,
    /// The frames as received, to forward unchanged.
    raw: Vec<u8>,
}

/// Buffers reused across blocks.
#[derive(Debug, Default)]
struct Scratch {
    /// (start, end) of each representation of the block.
    spans: Vec<(usize, usize)>,
    /// One representation, as the decoder takes it.
    representation: Vec<u8>,
    /// Decoded fields: name, value, decoder flags.
    fields: Vec<(Vec<u8>, Vec<u8>, u8)>,
    encoded: Vec<u8>,
}

// === impl AuthorityNormalizer ===

impl AuthorityNormalizer {
    /// A normaliser for a new connection.
    pub fn new() -> Self {
        let mut decoder = httlib_hpack::Decoder::with_dynamic_size(DEFAULT_TABLE_SIZE as u32);
        decoder.set_max_dynamic_size(DEFAULT_TABLE_SIZE as u32);
        Self {
            preface: Some(0),
            pass_remaining: 0,
            pending: BytesMut::new(),
            block: None,
            decoder,
            allowed_table_size: DEFAULT_TABLE_SIZE,
            rewriting: false,
            rewritten: 0,
            scratch: Scratch::default(),
            server: ServerObserver::default(),
        }
    }

    /// How many header blocks were re-encoded so far.
    pub fn rewritten_blocks(&self) -> u64 {
        self.rewritten
    }

    /// Processes a chunk of client bytes, appending what h2 should see to `out`. An error means
    /// the connection must be closed.
    pub fn feed(&mut self, mut input: &[u8], out: &mut BytesMut) -> Result<(), AuthorityError> {
        loop {
            let keep = self.pass_through_len(input);
            out.extend_from_slice(&input[..keep]);
            input = &input[keep..];
            if input.is_empty() {
                return Ok(());
            }
            self.step(&mut input, out)?;
        }
    }

    /// How many leading bytes of `input` pass unchanged, advancing over them: the fast path for
    /// the payload and headers of frames other than header blocks. The rest of `input` must then
    /// go to [`feed`](Self::feed).
    pub fn pass_through_len(&mut self, input: &[u8]) -> usize {
        if self.preface.is_some() || !self.pending.is_empty() {
            return 0;
        }
        let mut at = 0;
        loop {
            if self.pass_remaining > 0 {
                let take = self.pass_remaining.min(input.len() - at);
                self.pass_remaining -= take;
                at += take;
                if self.pass_remaining > 0 {
                    return at;
                }
            }
            let Some(header) = input.get(at..at + FRAME_HEADER_LEN) else {
                return at;
            };
            if self.block.is_some() || is_header_block_type(header[3]) {
                return at;
            }
            self.pass_remaining = frame_len(header);
            at += FRAME_HEADER_LEN;
        }
    }

    /// Feeds bytes the server wrote to the client, to follow its `SETTINGS_HEADER_TABLE_SIZE`.
    pub fn observe_server(&mut self, written: &[u8]) {
        if let Some(size) = self.server.observe(written) {
            let size = size.min(MAX_DYNAMIC_TABLE);
            if size > self.allowed_table_size {
                // Never lowered: blocks the client encoded before it saw a lower value may still
                // use the old one, and h2 does its own check on what it decodes.
                self.allowed_table_size = size;
                // `size <= MAX_DYNAMIC_TABLE`, which fits in a u32.
                self.decoder
                    .set_max_dynamic_size(u32::try_from(size).unwrap_or(u32::MAX));
            }
        }
    }

    /// Consumes bytes from `input` into `pending` until one unit (the preface, a pass-through
    /// frame header, or a whole header-block frame) is complete, and processes it.
    fn step(&mut self, input: &mut &[u8], out: &mut BytesMut) -> Result<(), AuthorityError> {
        if let Some(matched) = self.preface {
            let take = (PREFACE.len() - matched).min(input.len());
            if input[..take] != PREFACE[matched..matched + take] {
                return Err(AuthorityError::BadPreface);
            }
            out.extend_from_slice(&input[..take]);
            *input = &input[take..];
            let matched = matched + take;
            self.preface = (matched < PREFACE.len()).then_some(matched);
            return Ok(());
        }
        if self.pending.len() < FRAME_HEADER_LEN {
            let take = (FRAME_HEADER_LEN - self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            *input = &input[take..];
            if self.pending.len() < FRAME_HEADER_LEN {
                return Ok(());
            }
            let frame_type = self.pending[3];
            let len = frame_len(&self.pending);
            if !is_header_block_type(frame_type) {
                if self.block.is_some() {
                    return Err(AuthorityError::InterruptedHeaderBlock { frame_type });
                }
                out.extend_from_slice(&self.pending);
                self.pending.clear();
                self.pass_remaining = len;
                return Ok(());
            }
            if frame_type == TYPE_PUSH_PROMISE {
                return Err(AuthorityError::PushPromiseFromClient);
            }
            let received = self.block.as_ref().map_or(0, |b| b.raw.len());
            if received + FRAME_HEADER_LEN + len > MAX_HEADER_BLOCK {
                return Err(AuthorityError::HeaderBlockTooLarge {
                    limit: MAX_HEADER_BLOCK,
                });
            }
        }
        let want = FRAME_HEADER_LEN + frame_len(&self.pending);
        let take = (want - self.pending.len()).min(input.len());
        self.pending.extend_from_slice(&input[..take]);
        *input = &input[take..];
        if self.pending.len() < want {
            return Ok(());
        }
        let frame = std::mem::take(&mut self.pending);
        let result = self.header_frame(&frame, out);
        // Keep the allocation for the next frame.
        self.pending = frame;
        self.pending.clear();
        result
    }

    /// Handles a complete `HEADERS` or `CONTINUATION` frame.
    fn header_frame(&mut self, frame: &[u8], out: &mut BytesMut) -> Result<(), AuthorityError> {
        let frame_type = frame[3];
        let flags = frame[4];
        let stream_id = stream_id(frame);
        let payload = &frame[FRAME_HEADER_LEN..];
        let block = match (frame_type, self.block.take()) {
            (TYPE_HEADERS, None) => {
                let (priority, fragment) = split_headers_payload(flags, payload)?;
                Block {
                    stream_id,
                    flags: flags & (FLAG_END_STREAM | FLAG_PRIORITY),
                    priority,
                    fragment: fragment.to_vec(),
                    raw: frame.to_vec(),
                }
            }
            (TYPE_CONTINUATION, Some(mut block)) if block.stream_id == stream_id => {
                block.fragment.extend_from_slice(payload);
                block.raw.extend_from_slice(frame);
                block
            }
            (TYPE_CONTINUATION, None) => return Err(AuthorityError::UnexpectedContinuation),
            (frame_type, _) => return Err(AuthorityError::InterruptedHeaderBlock { frame_type }),
        };
        if flags & FLAG_END_HEADERS == 0 {
            self.block = Some(block);
            return Ok(());
        }
        self.finish_block(&block, out)
    }

    /// Decodes a complete header block and forwards it, unchanged or re-encoded.
    fn finish_block(&mut self, block: &Block, out: &mut BytesMut) -> Result<(), AuthorityError> {
        let scratch = &mut self.scratch;
        scan_representations(&block.fragment, &mut scratch.spans)?;
        scratch.fields.clear();
        let mut list_size = 0usize;
        let mut invalid_authority = false;
        for &(start, end) in &scratch.spans {
            let first = scratch.fields.len();
            scratch.representation.clear();
            scratch
                .representation
                .extend_from_slice(&block.fragment[start..end]);
            self.decoder
                .decode(&mut scratch.representation, &mut scratch.fields)?;
            for (name, value, _) in &scratch.fields[first..] {
                list_size = list_size.saturating_add(name.len() + value.len() + 32);
                if name == b":authority" && !is_valid_authority(value) {
                    invalid_authority = true;
                }
            }
            if list_size > MAX_HEADER_LIST {
                return Err(AuthorityError::HeaderListTooLarge {
                    limit: MAX_HEADER_LIST,
                });
            }
        }
        if !invalid_authority && !self.rewriting {
            out.extend_from_slice(&block.raw);
            return Ok(());
        }
        if !self.rewriting {
            tracing::debug!("re-encoding header blocks: the client sent an invalid :authority");
        }
        self.rewriting = true;
        self.rewritten += 1;
        scratch.encoded.clear();
        for (name, value, flags) in &scratch.fields {
            let value = if name == b":authority" && !is_valid_authority(value) {
                REPLACEMENT_AUTHORITY
            } else {
                value
            };
            let never_indexed = flags & httlib_hpack::Decoder::NEVER_INDEXED != 0;
            encode_literal(&mut scratch.encoded, name, value, never_indexed);
        }
        write_header_frames(out, block, &scratch.encoded);
        Ok(())
    }
}

impl Default for AuthorityNormalizer {
    fn default() -> Self {
        Self::new()
    }
}

/// Follows the server-to-client frames, to read the server's `SETTINGS_HEADER_TABLE_SIZE`.
#[derive(Debug, Default)]
struct ServerObserver {
    header: [u8; FRAME_HEADER_LEN],
    have: usize,
    remaining: usize,
    /// The payload of a SETTINGS frame being collected.
    settings: Option<Vec<u8>>,
}

// === impl ServerObserver ===

impl ServerObserver {
    /// Returns the last `SETTINGS_HEADER_TABLE_SIZE` completed in `written`, if any.
    fn observe(&mut self, mut written: &[u8]) -> Option<usize> {
        let mut found = None;
        while !written.is_empty() {
            if self.have < FRAME_HEADER_LEN {
                let take = (FRAME_HEADER_LEN - self.have).min(written.len());
                self.header[self.have..self.have + take].copy_from_slice(&written[..take]);
                self.have += take;
                written = &written[take..];
                if self.have < FRAME_HEADER_LEN {
                    break;
                }
                self.remaining = frame_len(&self.header);
                let ack = self.header[4] & 0x1 != 0;
                self.settings = (self.header[3] == TYPE_SETTINGS
                    && !ack
                    && self.remaining <= MAX_OBSERVED_SETTINGS)
                    .then(Vec::new);
            }
            let take = self.remaining.min(written.len());
            if let Some(settings) = &mut self.settings {
                settings.extend_from_slice(&written[..take]);
            }
            self.remaining -= take;
            written = &written[take..];
            if self.remaining == 0 {
                self.have = 0;
                if let Some(settings) = self.settings.take() {
                    for entry in settings.chunks_exact(6) {
                        let id = u16::from_be_bytes([entry[0], entry[1]]);
                        if id == SETTINGS_HEADER_TABLE_SIZE {
                            let value =
                                u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
                            found = Some(usize::try_from(value).unwrap_or(usize::MAX));
                        }
                    }
                }
            }
        }
        found
    }
}

/// Whether h2 accepts `value` as a request's `:authority`: the exact parse h2 0.4 does.
pub fn is_valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

fn is_header_block_type(frame_type: u8) -> bool {
    matches!(
        frame_type,
        TYPE_HEADERS | TYPE_CONTINUATION | TYPE_PUSH_PROMISE
    )
}

fn frame_len(header: &[u8]) -> usize {
    (usize::from(header[0]) << 16) | (usize::from(header[1]) << 8) | usize::from(header[2])
}

fn stream_id(header: &[u8]) -> u32 {
    u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff
}

/// Splits a `HEADERS` payload into its priority fields and its header block fragment.
fn split_headers_payload(
    flags: u8,
    payload: &[u8],
) -> Result<(Option<[u8; 5]>, &[u8]), AuthorityError> {
    let mut rest = payload;
    let mut pad = 0;
    if flags & FLAG_PADDED != 0 {
        let (&len, tail) = rest.split_first().ok_or(AuthorityError::BadHeadersFrame)?;
        pad = usize::from(len);
        rest = tail;
    }
    let mut priority = None;
    if flags & FLAG_PRIORITY != 0 {
        let (fields, tail) = rest
            .split_first_chunk::<5>()
            .ok_or(AuthorityError::BadHeadersFrame)?;
        priority = Some(*fields);
        rest = tail;
    }
    let end = rest
        .len()
        .checked_sub(pad)
        .ok_or(AuthorityError::BadHeadersFrame)?;
    Ok((priority, &rest[..end]))
}

/// Splits a header block into its representations (RFC 7541 section 6) without decoding
/// strings, checking that every integer and string is complete and in bounds. Rejects a dynamic
/// table size update after the first field (as h2 does), and more than a few of them.
fn scan_representations(
    block: &[u8],
    spans: &mut Vec<(usize, usize)>,
) -> Result<(), AuthorityError> {
    spans.clear();
    let mut at = 0;
    let mut fields = 0usize;
    while let Some(&first) = block.get(at) {
        let start = at;
        if first & 0x80 != 0 {
            at = skip_integer(block, at, 7)?;
            fields += 1;
        } else if first & 0xe0 == 0x20 {
            if fields > 0 {
                return Err(AuthorityError::Hpack(
                    "dynamic table size update after a header field",
                ));
            }
            if spans.len() >= MAX_SIZE_UPDATES {
                return Err(AuthorityError::Hpack("too many dynamic table size updates"));
            }
            at = skip_integer(block, at, 5)?;
        } else {
            let prefix = if first & 0x40 != 0 { 6 } else { 4 };
            let name_index_zero = first & ((1u8 << prefix) - 1) == 0;
            at = skip_integer(block, at, prefix)?;
            if name_index_zero {
                at = skip_string(block, at)?;
            }
            at = skip_string(block, at)?;
            fields += 1;
        }
        spans.push((start, at));
    }
    Ok(())
}

/// Reads an HPACK integer with an N-bit prefix at `at`; returns its value and the next offset.
/// At most five octets, as h2 and the decoder accept.
fn read_integer(block: &[u8], at: usize, prefix: u32) -> Result<(usize, usize), AuthorityError> {
    const TRUNCATED: AuthorityError = AuthorityError::Hpack("truncated integer");
    let mask = (1usize << prefix) - 1;
    let first = usize::from(*block.get(at).ok_or(TRUNCATED)?) & mask;
    if first < mask {
        return Ok((first, at + 1));
    }
    let mut value = mask;
    for (shift, i) in (at + 1..at + 5).enumerate() {
        let byte = *block.get(i).ok_or(TRUNCATED)?;
        value += usize::from(byte & 0x7f) << (7 * shift);
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(AuthorityError::Hpack("integer too large"))
}

fn skip_integer(block: &[u8], at: usize, prefix: u32) -> Result<usize, AuthorityError> {
    read_integer(block, at, prefix).map(|(_, next)| next)
}

fn skip_string(block: &[u8], at: usize) -> Result<usize, AuthorityError> {
    let (len, start) = read_integer(block, at, 7)?;
    let end = start
        .checked_add(len)
        .filter(|&end| end <= block.len())
        .ok_or(AuthorityError::Hpack("truncated string"))?;
    Ok(end)
}

/// Appends an HPACK integer with an N-bit prefix; `first` holds the representation's high bits.
fn encode_integer(out: &mut Vec<u8>, first: u8, prefix: u32, mut value: usize) {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        // `value < mask <= 127`, so it fits in the prefix bits.
        out.push(first | (value as u8));
        return;
    }
    out.push(first | (mask as u8));
    value -= mask;
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends a literal field with a literal name that leaves the dynamic table alone: "without
/// indexing", or "never indexed" (RFC 7541 sections 6.2.2 and 6.2.3). No Huffman coding.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8], never_indexed: bool) {
    out.push(if never_indexed { 0x10 } else { 0x00 });
    encode_integer(out, 0, 7, name.len());
    out.extend_from_slice(name);
    encode_integer(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// Writes a re-encoded block as one `HEADERS` frame and as many `CONTINUATION` frames as needed.
fn write_header_frames(out: &mut BytesMut, block: &Block, encoded: &[u8]) {
    let priority_len = if block.priority.is_some() { 5 } else { 0 };
    let first_len = encoded.len().min(OUT_FRAME_MAX - priority_len);
    let (first, mut rest) = encoded.split_at(first_len);
    let mut flags = block.flags;
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    put_frame_header(
        out,
        first_len + priority_len,
        TYPE_HEADERS,
        flags,
        block.stream_id,
    );
    if let Some(priority) = &block.priority {
        out.extend_from_slice(priority);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(OUT_FRAME_MAX));
        rest = tail;
        let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        put_frame_header(out, chunk.len(), TYPE_CONTINUATION, flags, block.stream_id);
        out.extend_from_slice(chunk);
    }
}

fn put_frame_header(out: &mut BytesMut, len: usize, frame_type: u8, flags: u8, stream_id: u32) {
    // `len <= OUT_FRAME_MAX`, which fits in 24 bits.
    let len = u32::try_from(len).unwrap_or(0);
    out.put_slice(&len.to_be_bytes()[1..]);
    out.put_u8(frame_type);
    out.put_u8(flags);
    out.put_u32(stream_id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_round_trip_through_the_scanner() {
        for prefix in [4, 5, 6, 7] {
            for value in [
                0,
                1,
                14,
                15,
                16,
                30,
                31,
                62,
                63,
                64,
                126,
                127,
                128,
                300,
                16_383,
                1 << 20,
                (1 << 28) - 1,
            ] {
                let mut out = Vec::new();
                encode_integer(&mut out, 0, prefix, value);
                assert_eq!(read_integer(&out, 0, prefix).unwrap(), (value, out.len()));
            }
        }
    }

    #[test]
    fn valid_and_invalid_authorities() {
        assert!(is_valid_authority(b"localhost"));
        assert!(is_valid_authority(b"example.org:443"));
        assert!(is_valid_authority(b"[::1]:50051"));
        assert!(!is_valid_authority(b""));
        assert!(!is_valid_authority(b"tmp%2Fsigil%2Fapi.sock"));
        assert!(!is_valid_authority(b"/tmp/sigil/api.sock"));
    }

    #[test]
    fn server_settings_raise_the_allowed_table_size() {
        let mut n = AuthorityNormalizer::new();
        // SETTINGS with HEADER_TABLE_SIZE = 8192 and MAX_FRAME_SIZE, written in two pieces.
        let frame = [
            0, 0, 12, 4, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0x20, 0, 0, 5, 0, 0, 0x40, 0,
        ];
        n.observe_server(&frame[..7]);
        assert_eq!(n.allowed_table_size, DEFAULT_TABLE_SIZE);
        n.observe_server(&frame[7..]);
        assert_eq!(n.allowed_table_size, 8192);
        // Capped.
        n.observe_server(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 1, 0x7f, 0, 0, 0]);
        assert_eq!(n.allowed_table_size, MAX_DYNAMIC_TABLE);
    }
}
