//! Generated gRPC types and services for the ssp agent and coordinator APIs.
#![allow(clippy::all, missing_docs)]

/// Version 1 of the ssp wire protocol.
pub mod v1 {
    tonic::include_proto!("ssp.v1");
}
pub use v1::*;
