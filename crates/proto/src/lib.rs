//! # coalesce-proto — generated gRPC code
//!
//! Rust types and tonic services generated from `proto/coalesce/v1/`. Protos are the contract:
//! clients in other languages generate from the same files. Only tonic and prost here.
#![allow(missing_docs, unreachable_pub, missing_debug_implementations, clippy::all)]

pub mod codec;

pub mod v1 {
    tonic::include_proto!("coalesce.v1");
}

/// The encoded `FileDescriptorSet` of every Coalesce proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("coalesce_descriptor");
