//! The gRPC codec of every Coalesce service: prost's, except that a message that does not
//! decode (malformed or truncated protobuf, invalid UTF-8 in a string field) is
//! INVALID_ARGUMENT rather than prost's INTERNAL. The request is what is wrong, and clients
//! commonly retry INTERNAL: a malformed request retried forever helps nobody. (The gRPC status
//! code guide lists INTERNAL for parse errors; we depart from it on purpose, and say so in
//! docs/api.md.) The same codec decodes answers in the generated clients, where an undecodable
//! answer is then INVALID_ARGUMENT too.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = InvalidArgument<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        InvalidArgument(ProstCodec::<T, U>::default().decoder())
    }
}

/// prost's decoder, its decode errors turned into INVALID_ARGUMENT.
#[derive(Debug)]
pub struct InvalidArgument<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for InvalidArgument<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            if s.code() == tonic::Code::Internal {
                Status::invalid_argument(format!("the message does not decode as protobuf: {}", s.message()))
            } else {
                s
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
