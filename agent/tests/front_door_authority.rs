//! The `:authority` layer on its own: property tests (arbitrary header blocks, encoded with
//! Huffman coding, indexing, "never indexed" and table size updates, split into HEADERS + CONTINUATION at arbitrary points and
//! read in arbitrary chunks, decode after the layer to the same headers, except an invalid
//! `:authority`, which becomes `localhost`), byte-for-byte pass-through of valid connections, and
//! the bounds that close a connection.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use httlib_hpack::{Decoder, Encoder};
use proptest::prelude::*;
use sigil_agent::workload_api::http_authority::{
    AuthorityNormalizer, MAX_HEADER_BLOCK, NormalizeAuthority, is_valid_authority,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// A connection that delivers its bytes in the given chunks and swallows what is written to it.
struct Chunked {
    chunks: VecDeque<Vec<u8>>,
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(chunk) = self.chunks.front_mut() {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            chunk.drain(..n);
            if chunk.is_empty() {
                self.chunks.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Chunked {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Runs `input` through the layer, split into chunks at `cuts` (offsets), reading with buffers
/// of the given sizes in turn.
fn through_layer(input: &[u8], cuts: &[usize], read_sizes: &[usize]) -> io::Result<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(0);
    points.push(input.len());
    points.sort_unstable();
    points.dedup();
    let chunks = points
        .windows(2)
        .map(|w| input[w[0]..w[1]].to_vec())
        .collect();
    let mut layer = NormalizeAuthority::new(Chunked { chunks });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            let size = read_sizes
                .get(i % read_sizes.len().max(1))
                .copied()
                .unwrap_or(4096)
                .max(1);
            i += 1;
            let mut buf = vec![0; size];
            let n = layer.read(&mut buf).await?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    })
}

/// One frame as parsed back from a byte stream.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Frame {
    frame_type: u8,
    flags: u8,
    stream_id: u32,
    payload: Vec<u8>,
}

fn frame(frame_type: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], frame_type, flags];
    out.extend_from_slice(&stream_id.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn parse_frames(bytes: &[u8]) -> Vec<Frame> {
    assert!(bytes.starts_with(PREFACE), "the preface passes unchanged");
    let mut rest = &bytes[PREFACE.len()..];
    let mut frames = Vec::new();
    while !rest.is_empty() {
        assert!(rest.len() >= 9, "truncated frame header");
        let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
        frames.push(Frame {
            frame_type: rest[3],
            flags: rest[4],
            stream_id: u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]),
            payload: rest[9..9 + len].to_vec(),
        });
        rest = &rest[9 + len..];
    }
    frames
}

/// What h2 would see: each header block (stream, END_STREAM, priority fields, decoded fields as
/// (name, value, never indexed)) and every other frame, in order.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Headers {
        stream_id: u32,
        end_stream: bool,
        priority: Option<Vec<u8>>,
        fields: Vec<(Vec<u8>, Vec<u8>, bool)>,
    },
    Other(Frame),
}

/// Decodes with two independent HPACK implementations (the layer uses httlib-hpack): loona-hpack
/// for names and values, httlib-hpack for the "never indexed" flags; both must agree.
fn events(frames: &[Frame]) -> Vec<Event> {
    let mut decoder = Decoder::with_dynamic_size(4096);
    let mut reference = loona_hpack::Decoder::new();
    let mut events = Vec::new();
    /// (stream, END_STREAM, priority fields, fragment) of the block being read.
    type OpenBlock = (u32, bool, Option<Vec<u8>>, Vec<u8>);
    let mut open: Option<OpenBlock> = None;
    for f in frames {
        match f.frame_type {
            HEADERS => {
                assert!(open.is_none());
                let mut p = &f.payload[..];
                let mut pad = 0;
                if f.flags & PADDED != 0 {
                    pad = usize::from(p[0]);
                    p = &p[1..];
                }
                let mut priority = None;
                if f.flags & PRIORITY != 0 {
                    priority = Some(p[..5].to_vec());
                    p = &p[5..];
                }
                let fragment = p[..p.len() - pad].to_vec();
                open = Some((f.stream_id, f.flags & END_STREAM != 0, priority, fragment));
                if f.flags & END_HEADERS == 0 {
                    continue;
                }
            }
            CONTINUATION => {
                let block = open.as_mut().expect("continuation inside a block");
                assert_eq!(block.0, f.stream_id);
                block.3.extend_from_slice(&f.payload);
                if f.flags & END_HEADERS == 0 {
                    continue;
                }
            }
            _ => {
                assert!(open.is_none());
                events.push(Event::Other(f.clone()));
                continue;
            }
        }
        let (stream_id, end_stream, priority, mut fragment) = open.take().unwrap();
        let expected = reference.decode(&fragment).expect("valid hpack");
        let mut fields = Vec::new();
        decoder
            .decode(&mut fragment, &mut fields)
            .expect("valid hpack");
        let names_values: Vec<_> = fields
            .iter()
            .map(|(n, v, _)| (n.clone(), v.clone()))
            .collect();
        assert_eq!(names_values, expected, "the two decoders agree");
        events.push(Event::Headers {
            stream_id,
            end_stream,
            priority,
            fields: fields
                .into_iter()
                .map(|(n, v, flags)| (n, v, flags & Decoder::NEVER_INDEXED != 0))
                .collect(),
        });
    }
    assert!(open.is_none());
    events
}

/// The expected view: invalid authorities replaced.
fn normalised(events: Vec<Event>) -> Vec<Event> {
    events
        .into_iter()
        .map(|e| match e {
            Event::Headers {
                stream_id,
                end_stream,
                priority,
                fields,
            } => Event::Headers {
                stream_id,
                end_stream,
                priority,
                fields: fields
                    .into_iter()
                    .map(|(n, v, ni)| {
                        if n == b":authority" && !is_valid_authority(&v) {
                            (n, b"localhost".to_vec(), ni)
                        } else {
                            (n, v, ni)
                        }
                    })
                    .collect(),
            },
            other => other,
        })
        .collect()
}

#[derive(Clone, Debug)]
struct Field {
    name: String,
    value: String,
    huffman: bool,
    /// 0: without indexing, 1: with indexing, 2: never indexed
    indexing: u8,
    best: bool,
}

#[derive(Clone, Debug)]
struct BlockSpec {
    authority: Option<String>,
    fields: Vec<Field>,
    size_update: Option<u32>,
    end_stream: bool,
    padding: Option<u8>,
    priority: Option<[u8; 5]>,
    /// Cut points of the fragment into HEADERS + CONTINUATION.
    cuts: Vec<usize>,
    /// A frame that passes through, sent after this block.
    after: Option<(u8, u8, Vec<u8>)>,
}

fn authority() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        "[a-z]{1,12}(:[0-9]{1,5})?".prop_map(Some),
        "tmp%2F[a-z]{1,8}%2Fapi\\.sock".prop_map(Some),
        "/[a-z]{1,8}/api\\.sock".prop_map(Some),
        Just(Some(String::new())),
        "[ -~]{0,20}".prop_map(Some),
    ]
}

fn field() -> impl Strategy<Value = Field> {
    (
        prop_oneof![
            "[a-z][a-z0-9-]{0,15}",
            Just("content-type".to_owned()),
            Just("workload.spiffe.io".to_owned()),
            Just("te".to_owned()),
        ],
        prop_oneof![
            8 => "[ -~]{0,40}",
            1 => "[a-z]{1000,3000}",
        ],
        any::<bool>(),
        0u8..3,
        any::<bool>(),
    )
        .prop_map(|(name, value, huffman, indexing, best)| Field {
            name,
            value,
            huffman,
            indexing,
            best,
        })
}

fn block() -> impl Strategy<Value = BlockSpec> {
    (
        authority(),
        prop::collection::vec(field(), 0..8),
        prop::option::weighted(0.15, prop_oneof![Just(0u32), Just(256), Just(4096)]),
        any::<bool>(),
        prop::option::weighted(0.3, any::<u8>()),
        prop::option::weighted(0.3, any::<[u8; 5]>()),
        prop::collection::vec(any::<usize>(), 0..4),
        prop::option::weighted(
            0.5,
            (
                prop_oneof![Just(0u8), Just(6), Just(8), Just(3), Just(0x42)],
                any::<u8>(),
                prop::collection::vec(any::<u8>(), 0..300),
            ),
        ),
    )
        .prop_map(
            |(authority, fields, size_update, end_stream, padding, priority, cuts, after)| {
                BlockSpec {
                    authority,
                    fields,
                    size_update,
                    end_stream,
                    padding,
                    priority,
                    cuts,
                    after,
                }
            },
        )
}

/// Encodes a connection: preface, client SETTINGS, then each block as HEADERS + CONTINUATION
/// frames, each followed by an optional pass-through frame.
fn encode_connection(blocks: &[BlockSpec]) -> Vec<u8> {
    let mut encoder = Encoder::with_dynamic_size(4096);
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]));
    for (i, spec) in blocks.iter().enumerate() {
        let stream_id = u32::try_from(2 * i + 1).unwrap();
        let mut fragment = Vec::new();
        if let Some(size) = spec.size_update {
            encoder
                .update_max_dynamic_size(size, &mut fragment)
                .unwrap();
        }
        let mut fields = vec![
            Field {
                name: ":method".into(),
                value: "POST".into(),
                huffman: false,
                indexing: 0,
                best: true,
            },
            Field {
                name: ":scheme".into(),
                value: "http".into(),
                huffman: false,
                indexing: 0,
                best: true,
            },
        ];
        if let Some(authority) = &spec.authority {
            fields.push(Field {
                name: ":authority".into(),
                value: authority.clone(),
                huffman: i % 2 == 0,
                indexing: 1,
                best: true,
            });
        }
        fields.push(Field {
            name: ":path".into(),
            value: "/SpiffeWorkloadAPI/FetchJWTSVID".into(),
            huffman: true,
            indexing: 1,
            best: true,
        });
        fields.extend(spec.fields.iter().cloned());
        for f in &fields {
            let mut flags = 0;
            if f.huffman {
                flags |= Encoder::HUFFMAN_NAME | Encoder::HUFFMAN_VALUE;
            }
            flags |= match f.indexing {
                1 => Encoder::WITH_INDEXING,
                2 => Encoder::NEVER_INDEXED,
                _ => 0,
            };
            if f.best {
                flags |= Encoder::BEST_FORMAT;
            }
            encoder
                .encode(
                    (
                        f.name.as_bytes().to_vec(),
                        f.value.as_bytes().to_vec(),
                        flags,
                    ),
                    &mut fragment,
                )
                .unwrap();
        }
        // Split the fragment: the first piece goes into HEADERS (at most 16 KiB minus the
        // padding and priority fields), the rest into CONTINUATION frames.
        let mut points: Vec<usize> = spec.cuts.iter().map(|c| c % (fragment.len() + 1)).collect();
        let mut at = 0;
        while fragment.len() - at > 16_000 {
            at += 16_000;
            points.push(at);
        }
        points.push(0);
        points.push(fragment.len());
        points.sort_unstable();
        points.dedup();
        let pieces: Vec<&[u8]> = points.windows(2).map(|w| &fragment[w[0]..w[1]]).collect();
        let pieces = if pieces.is_empty() {
            vec![&fragment[..]]
        } else {
            pieces
        };
        for (k, piece) in pieces.iter().enumerate() {
            let last = k + 1 == pieces.len();
            let mut flags = if last { END_HEADERS } else { 0 };
            if k == 0 {
                let mut payload = Vec::new();
                if spec.end_stream {
                    flags |= END_STREAM;
                }
                if let Some(pad) = spec.padding {
                    flags |= PADDED;
                    payload.push(pad % 32);
                }
                if let Some(priority) = spec.priority {
                    flags |= PRIORITY;
                    payload.extend_from_slice(&priority);
                }
                payload.extend_from_slice(piece);
                if let Some(pad) = spec.padding {
                    payload.extend(std::iter::repeat_n(0, usize::from(pad % 32)));
                }
                out.extend(frame(HEADERS, flags, stream_id, &payload));
            } else {
                out.extend(frame(CONTINUATION, flags, stream_id, piece));
            }
        }
        if let Some((frame_type, flags, payload)) = &spec.after {
            out.extend(frame(*frame_type, *flags, stream_id, payload));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Header blocks decode after the layer to the same fields (names, values, "never indexed"),
    /// with END_STREAM and priority kept and every other frame unchanged, except that an invalid
    /// `:authority` becomes `localhost`; however the bytes are split into frames and reads.
    #[test]
    fn front_door_header_blocks_survive_the_layer_except_invalid_authority(
        blocks in prop::collection::vec(block(), 1..10),
        cuts in prop::collection::vec(any::<usize>(), 0..40),
        read_sizes in prop::collection::vec(1usize..20_000, 1..8),
    ) {
        let input = encode_connection(&blocks);
        let output = through_layer(&input, &cuts, &read_sizes).unwrap();
        let before = events(&parse_frames(&input));
        let after = events(&parse_frames(&output));
        prop_assert_eq!(after, normalised(before));

        // A connection whose every authority is valid passes byte for byte.
        let all_valid = blocks
            .iter()
            .all(|b| b.authority.as_deref().is_none_or(|a| is_valid_authority(a.as_bytes())));
        if all_valid {
            prop_assert!(output == input, "valid connections pass unchanged");
        } else {
            prop_assert!(output != input, "an invalid authority is rewritten");
        }
    }

    /// Arbitrary bytes after the preface never panic the layer: they pass, or close the
    /// connection with an error.
    #[test]
    fn front_door_arbitrary_frames_never_panic(
        body in prop::collection::vec(any::<u8>(), 0..2000),
        cuts in prop::collection::vec(any::<usize>(), 0..10),
    ) {
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&body);
        let _ = through_layer(&input, &cuts, &[7, 4096]);
    }

    /// Arbitrary HPACK in a well-framed HEADERS frame never panics the layer.
    #[test]
    fn front_door_arbitrary_hpack_never_panics(
        fragments in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 1..5),
    ) {
        let mut input = PREFACE.to_vec();
        for (i, fragment) in fragments.iter().enumerate() {
            input.extend(frame(HEADERS, END_HEADERS, u32::try_from(2 * i + 1).unwrap(), fragment));
        }
        let _ = through_layer(&input, &[], &[4096]);
    }
}

/// A request as gRPC C-core sends it over a Unix socket.
fn c_core_request(encoder: &mut Encoder<'_>, authority: &str) -> Vec<u8> {
    let mut fragment = Vec::new();
    for (name, value, flags) in [
        (":method", "POST", Encoder::BEST_FORMAT),
        (":scheme", "http", Encoder::BEST_FORMAT),
        (
            ":path",
            "/SpiffeWorkloadAPI/FetchJWTSVID",
            Encoder::WITH_INDEXING | Encoder::BEST_FORMAT,
        ),
        (
            ":authority",
            authority,
            Encoder::WITH_INDEXING | Encoder::BEST_FORMAT | Encoder::HUFFMAN_VALUE,
        ),
        (
            "workload.spiffe.io",
            "true",
            Encoder::WITH_INDEXING | Encoder::BEST_FORMAT,
        ),
    ] {
        encoder
            .encode(
                (name.as_bytes().to_vec(), value.as_bytes().to_vec(), flags),
                &mut fragment,
            )
            .unwrap();
    }
    fragment
}

#[test]
fn front_door_rewrites_an_indexed_authority_on_every_later_request() {
    let mut encoder = Encoder::with_dynamic_size(4096);
    let mut input = PREFACE.to_vec();
    let mut first_len = 0;
    for i in 0..50u32 {
        let fragment = c_core_request(&mut encoder, "tmp%2Fsigil%2Fapi.sock");
        if i == 0 {
            first_len = fragment.len();
        } else {
            // Later requests refer to the authority through the dynamic table: one byte.
            assert!(fragment.len() < first_len / 4);
        }
        input.extend(frame(HEADERS, END_HEADERS, 2 * i + 1, &fragment));
    }
    let output = through_layer(&input, &[], &[65_536]).unwrap();
    let events = events(&parse_frames(&output));
    assert_eq!(events.len(), 50);
    for event in events {
        let Event::Headers { fields, .. } = event else {
            panic!()
        };
        let authority: Vec<_> = fields.iter().filter(|f| f.0 == b":authority").collect();
        assert_eq!(authority.len(), 1);
        assert_eq!(authority[0].1, b"localhost");
    }
}

fn expect_closed(input: &[u8], what: &str) {
    let error = through_layer(input, &[], &[4096]).expect_err(what);
    assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{what}: {error}");
}

#[test]
fn front_door_closes_connections_that_break_the_rules() {
    let mut encoder = Encoder::with_dynamic_size(4096);
    let request = c_core_request(&mut encoder, "tmp%2Fx");

    expect_closed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not http/2");

    let mut input = PREFACE.to_vec();
    input.extend(frame(CONTINUATION, END_HEADERS, 1, &request));
    expect_closed(&input, "continuation outside a block");

    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, 0, 1, &request[..3]));
    input.extend(frame(0x0, 0, 1, b"data"));
    expect_closed(&input, "data inside a header block");

    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, 0, 1, &request[..3]));
    input.extend(frame(CONTINUATION, END_HEADERS, 3, &request[3..]));
    expect_closed(&input, "continuation of another stream");

    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, END_HEADERS | PADDED, 1, &[200, 1, 2, 3]));
    expect_closed(&input, "padding longer than the frame");

    let mut input = PREFACE.to_vec();
    input.extend(frame(0x5, END_HEADERS, 1, &[0, 0, 0, 2]));
    expect_closed(&input, "push_promise from a client");

    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, END_HEADERS, 1, &[0x80 | 0x7f, 0x7f]));
    expect_closed(&input, "index out of range");

    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, END_HEADERS, 1, &[0x82, 0x3f, 0x01]));
    expect_closed(&input, "size update after a field");

    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0x7f]));
    expect_closed(&input, "size update above the server's setting");

    // A block above the limit, in many CONTINUATION frames.
    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, 0, 1, &[0; 16_000]));
    for _ in 0..4 {
        input.extend(frame(CONTINUATION, 0, 1, &[0; 16_000]));
    }
    expect_closed(&input, "header block above the limit");

    // Endless empty CONTINUATION frames.
    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, 0, 1, &request));
    for _ in 0..(MAX_HEADER_BLOCK / 9 + 1) {
        input.extend(frame(CONTINUATION, 0, 1, &[]));
    }
    expect_closed(&input, "continuation flood");

    // An HPACK bomb: one large entry, then thousands of one-byte references to it.
    let mut bomb = Vec::new();
    let mut enc = Encoder::with_dynamic_size(4096);
    enc.encode(
        (b"x-big".to_vec(), vec![b'a'; 4000], Encoder::WITH_INDEXING),
        &mut bomb,
    )
    .unwrap();
    bomb.extend(std::iter::repeat_n(0x80 | 62, 10_000));
    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, END_HEADERS, 1, &bomb));
    expect_closed(&input, "decoded header list above the limit");
}

#[test]
fn front_door_sans_io_normalizer_matches_the_io_wrapper() {
    let mut encoder = Encoder::with_dynamic_size(4096);
    let mut input = PREFACE.to_vec();
    for i in 0..5u32 {
        let fragment = c_core_request(&mut encoder, "tmp%2Fsigil%2Fapi.sock");
        input.extend(frame(HEADERS, END_HEADERS, 2 * i + 1, &fragment));
        input.extend(frame(0x0, END_STREAM, 2 * i + 1, b"\0\0\0\0\0"));
    }
    let mut normalizer = AuthorityNormalizer::new();
    let mut out = bytes::BytesMut::new();
    for byte in &input {
        normalizer
            .feed(std::slice::from_ref(byte), &mut out)
            .unwrap();
    }
    assert_eq!(normalizer.rewritten_blocks(), 5);
    assert_eq!(&out[..], &through_layer(&input, &[], &[3]).unwrap()[..]);
}
