//! gRPC's framing over HTTP/2, for one unary call: the request's one length-prefixed message
//! (read with a bound), and the answers: the response message then the `grpc-status`
//! trailer, or a status alone (a "trailers-only" response, the status in the head).
//!
//! A message is a 5-byte prefix (a compressed flag, then the length as a big-endian `u32`)
//! and the bytes. keygate takes no compression: a compressed message is refused with
//! `UNIMPLEMENTED` when the call named an encoding (`grpc-encoding`), `INTERNAL` when it did
//! not (the gRPC spec's two cases). A message longer than [`MAX_MESSAGE`] is refused with
//! `RESOURCE_EXHAUSTED` as soon as its prefix is read; a body that is not exactly one message
//! (none, cut short, or more than one) with `INVALID_ARGUMENT`; one not in within
//! [`READ_DEADLINE`] with `DEADLINE_EXCEEDED`.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

/// The longest request message keygate reads: 1 MiB. A `CheckRequest` carries the original
/// request's head (and its body only when Envoy is configured to send it, which keygate does
/// not read); Envoy's own default header limit is 60 KiB.
pub const MAX_MESSAGE: usize = 1024 * 1024;

/// How long a call's message may take to arrive. Envoy sends it with the call's head, and
/// its own `ext_authz` timeout is 200 ms by default: this only bounds a stalled call.
pub const READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The bytes before each message.
const PREFIX: usize = 5;

static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
static GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
static GRPC_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("grpc-accept-encoding");
const APPLICATION_GRPC: HeaderValue = HeaderValue::from_static("application/grpc");

/// The gRPC status codes keygate answers with (`google.rpc.Code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Code {
    /// The call succeeded (a refused request is still a successful `Check`).
    Ok = 0,
    /// The request is malformed.
    InvalidArgument = 3,
    /// No route takes the request.
    NotFound = 5,
    /// The key may not do this.
    PermissionDenied = 7,
    /// The message did not arrive within [`READ_DEADLINE`].
    DeadlineExceeded = 4,
    /// The message is over [`MAX_MESSAGE`], or a rate limit refused the request.
    ResourceExhausted = 8,
    /// Another method, another codec, or a compression keygate does not take.
    Unimplemented = 12,
    /// A protocol error (a compressed message with no encoding named).
    Internal = 13,
    /// The key store cannot answer.
    Unavailable = 14,
    /// No valid key.
    Unauthenticated = 16,
}

/// A call refused before any decision: its status and a fixed message (plain ASCII, so it
/// needs no percent-encoding in `grpc-message`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// The status.
    pub code: Code,
    /// What was wrong.
    pub message: &'static str,
}

impl Failure {
    /// A failure with `code`.
    pub const fn new(code: Code, message: &'static str) -> Self {
        Failure { code, message }
    }
}

/// Whether `content_type` names gRPC with protobuf messages: `Some(true)` for
/// `application/grpc` and `application/grpc+proto` (parameters allowed), `Some(false)` for
/// gRPC with another codec, `None` for anything that is not gRPC.
pub fn content_type(content_type: Option<&HeaderValue>) -> Option<bool> {
    let v = content_type?.as_bytes();
    let rest = v.strip_prefix(b"application/grpc")?;
    let codec = rest.split(|&b| b == b';').next().unwrap_or_default();
    match codec {
        b"" | b"+proto" => Some(true),
        [b'+', ..] => Some(false),
        _ => None,
    }
}

/// Reads the request's one message, within `deadline` ([`READ_DEADLINE`]): its bytes, or the
/// failure that refuses the call. Stops reading at the first fault: a message declared
/// oversized or compressed is not read at all, and no body is buffered past the bound.
pub async fn read_message<B>(
    headers: &HeaderMap,
    body: B,
    deadline: std::time::Duration,
) -> Result<Bytes, Failure>
where
    B: Body<Data = Bytes> + Unpin,
{
    match tokio::time::timeout(deadline, read(headers, body)).await {
        Ok(read) => read,
        Err(_) => Err(Failure::new(
            Code::DeadlineExceeded,
            "the request message did not arrive in time",
        )),
    }
}

async fn read<B>(headers: &HeaderMap, mut body: B) -> Result<Bytes, Failure>
where
    B: Body<Data = Bytes> + Unpin,
{
    let named_encoding = headers
        .get(&GRPC_ENCODING)
        .is_some_and(|e| e.as_bytes() != b"identity");
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|_| Failure::new(Code::Internal, "the request body was cut short"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > PREFIX + MAX_MESSAGE {
            check_prefix(&buf, named_encoding)?;
            return Err(Failure::new(
                Code::ResourceExhausted,
                "the request message is over 1 MiB",
            ));
        }
        buf.put(data);
        check_prefix(&buf, named_encoding)?;
    }
    one_message(buf.freeze(), named_encoding)
}

/// Checks the prefix, once its 5 bytes are in: the compressed flag and the declared length.
fn check_prefix(buf: &[u8], named_encoding: bool) -> Result<(), Failure> {
    let Some(prefix) = buf.get(..PREFIX) else {
        return Ok(());
    };
    match prefix[0] {
        0 => {}
        1 if named_encoding => {
            return Err(Failure::new(
                Code::Unimplemented,
                "compressed messages are not accepted: send them uncompressed",
            ))
        }
        1 => {
            return Err(Failure::new(
                Code::Internal,
                "a compressed message without grpc-encoding",
            ))
        }
        _ => return Err(Failure::new(Code::Internal, "an invalid message flag")),
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(Failure::new(
            Code::ResourceExhausted,
            "the request message is over 1 MiB",
        ));
    }
    Ok(())
}

/// The one message of a whole request body.
fn one_message(mut body: Bytes, named_encoding: bool) -> Result<Bytes, Failure> {
    check_prefix(&body, named_encoding)?;
    if body.len() < PREFIX {
        return Err(Failure::new(
            Code::InvalidArgument,
            "the request has no message",
        ));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if body.len() != PREFIX + len {
        return Err(Failure::new(
            Code::InvalidArgument,
            "the request body is not exactly one message",
        ));
    }
    Ok(body.split_off(PREFIX))
}

/// The call's answer: `message` (already encoded) in one data frame, then `grpc-status: 0`.
pub fn respond(message: &impl prost::Message) -> Response<GrpcBody> {
    let len = message.encoded_len();
    let mut buf = Vec::with_capacity(PREFIX + len);
    buf.push(0);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    // Encoding into a buffer of the encoded length cannot fail.
    let _ = message.encode(&mut buf);
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert(GRPC_STATUS.clone(), HeaderValue::from_static("0"));
    let mut resp = Response::new(GrpcBody {
        data: Some(Bytes::from(buf)),
        trailers: Some(trailers),
    });
    resp.headers_mut()
        .insert(http::header::CONTENT_TYPE, APPLICATION_GRPC);
    resp
}

/// A call refused with `failure`: a trailers-only response (`grpc-status` and `grpc-message`
/// in the head, no body).
pub fn fail(failure: Failure) -> Response<GrpcBody> {
    let mut resp = Response::new(GrpcBody::default());
    let h = resp.headers_mut();
    h.insert(http::header::CONTENT_TYPE, APPLICATION_GRPC);
    h.insert(GRPC_STATUS.clone(), HeaderValue::from(failure.code as i32));
    h.insert(
        GRPC_MESSAGE.clone(),
        HeaderValue::from_static(failure.message),
    );
    if failure.code == Code::Unimplemented {
        h.insert(
            GRPC_ACCEPT_ENCODING.clone(),
            HeaderValue::from_static("identity"),
        );
    }
    resp
}

/// A request that is not gRPC at all: `415 Unsupported Media Type`, as the gRPC spec says a
/// server answers a content type that is not `application/grpc`.
pub fn not_grpc() -> Response<GrpcBody> {
    let body = crate::rejection::error_body(
        "unsupported_media_type",
        "this endpoint answers gRPC (envoy.service.auth.v3.Authorization/Check) only",
    );
    let mut resp = Response::new(GrpcBody {
        data: Some(Bytes::from(body)),
        trailers: None,
    });
    *resp.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A gRPC response body: at most one data frame, then trailers if any.
#[derive(Debug, Default)]
pub struct GrpcBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for GrpcBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    fn framed(flag: u8, msg: &[u8]) -> Bytes {
        let mut b = vec![flag];
        b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        b.extend_from_slice(msg);
        Bytes::from(b)
    }

    #[test]
    fn one_uncompressed_message_is_read() {
        assert_eq!(one_message(framed(0, b"abc"), false).unwrap(), &b"abc"[..]);
        assert_eq!(one_message(framed(0, b""), false).unwrap(), &b""[..]);
    }

    #[test]
    fn compressed_messages_are_refused_by_whether_an_encoding_was_named() {
        let code = |named| one_message(framed(1, b"abc"), named).unwrap_err().code;
        assert_eq!(code(true), Code::Unimplemented);
        assert_eq!(code(false), Code::Internal);
        let bad_flag = one_message(framed(2, b"abc"), false).unwrap_err();
        assert_eq!(bad_flag.code, Code::Internal);
    }

    #[test]
    fn anything_but_exactly_one_message_is_invalid() {
        let code = |b: Bytes| one_message(b, false).unwrap_err().code;
        assert_eq!(code(Bytes::new()), Code::InvalidArgument);
        assert_eq!(code(Bytes::from_static(&[0, 0, 0])), Code::InvalidArgument);
        let mut cut = framed(0, b"abcdef").to_vec();
        cut.pop();
        assert_eq!(code(Bytes::from(cut)), Code::InvalidArgument);
        let mut two = framed(0, b"ab").to_vec();
        two.extend_from_slice(&framed(0, b"cd"));
        assert_eq!(code(Bytes::from(two)), Code::InvalidArgument);
    }

    #[test]
    fn an_oversized_length_is_refused_from_the_prefix_alone() {
        let mut prefix = vec![0];
        prefix.extend_from_slice(&(MAX_MESSAGE as u32 + 1).to_be_bytes());
        assert_eq!(
            check_prefix(&prefix, false).unwrap_err().code,
            Code::ResourceExhausted
        );
        let mut at_max = vec![0];
        at_max.extend_from_slice(&(MAX_MESSAGE as u32).to_be_bytes());
        assert_eq!(check_prefix(&at_max, false), Ok(()));
    }

    /// A body of `chunks`, as the connection hands them over.
    fn body(chunks: Vec<Vec<u8>>) -> impl Body<Data = Bytes, Error = Infallible> + Unpin {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from(c))));
        http_body_util::StreamBody::new(futures_util::stream::iter(frames))
    }

    /// A body whose first frame never comes.
    struct Stalled;

    impl Body for Stalled {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Pending
        }
    }

    async fn read_chunks(chunks: Vec<Vec<u8>>) -> Result<Bytes, Failure> {
        read_message(&HeaderMap::new(), body(chunks), READ_DEADLINE).await
    }

    #[tokio::test]
    async fn a_message_split_anywhere_is_read_whole() {
        let msg = framed(0, b"hello world").to_vec();
        for at in 0..=msg.len() {
            let (a, b) = msg.split_at(at);
            let read = read_chunks(vec![a.to_vec(), b.to_vec()]).await;
            assert_eq!(read.unwrap(), &b"hello world"[..], "split at {at}");
        }
    }

    #[tokio::test]
    async fn a_body_past_the_bound_is_refused_as_it_arrives() {
        // The prefix declares a message within the bound, but more follows.
        let mut first = framed(0, &[0x0a; 16]).to_vec();
        first.truncate(PREFIX);
        first[1..5].copy_from_slice(&(MAX_MESSAGE as u32).to_be_bytes());
        let chunk = vec![0x0au8; 64 * 1024];
        let mut chunks = vec![first];
        chunks.extend(std::iter::repeat_n(chunk, MAX_MESSAGE / (64 * 1024) + 1));
        let read = read_chunks(chunks).await;
        assert_eq!(read.unwrap_err().code, Code::ResourceExhausted);
    }

    #[tokio::test]
    async fn a_stalled_message_is_refused_at_the_deadline() {
        let deadline = std::time::Duration::from_millis(20);
        let read = read_message(&HeaderMap::new(), Stalled, deadline).await;
        assert_eq!(read.unwrap_err().code, Code::DeadlineExceeded);
    }

    #[tokio::test]
    async fn a_named_encoding_makes_a_compressed_message_unimplemented() {
        let mut headers = HeaderMap::new();
        headers.insert(&GRPC_ENCODING, HeaderValue::from_static("gzip"));
        let read = read_message(
            &headers,
            body(vec![framed(1, b"x").to_vec()]),
            READ_DEADLINE,
        );
        assert_eq!(read.await.unwrap_err().code, Code::Unimplemented);
        headers.insert(&GRPC_ENCODING, HeaderValue::from_static("identity"));
        let read = read_message(
            &headers,
            body(vec![framed(1, b"x").to_vec()]),
            READ_DEADLINE,
        );
        assert_eq!(read.await.unwrap_err().code, Code::Internal);
    }

    #[test]
    fn content_types() {
        let ct = |v: &'static str| content_type(Some(&HeaderValue::from_static(v)));
        assert_eq!(ct("application/grpc"), Some(true));
        assert_eq!(ct("application/grpc+proto"), Some(true));
        assert_eq!(ct("application/grpc;charset=utf-8"), Some(true));
        assert_eq!(ct("application/grpc+json"), Some(false));
        assert_eq!(ct("application/grpcx"), None);
        assert_eq!(ct("application/json"), None);
        assert_eq!(content_type(None), None);
    }
}
