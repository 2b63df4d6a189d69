//! Colony's wire contracts: protobuf messages and gRPC services generated from `proto/colony/v1`.

/// Version 1 of the contracts. Breaking changes go into a new package, never into this one.
pub mod v1 {
    #![expect(clippy::all, reason = "generated code")]
    tonic::include_proto!("colony.v1");
}

mod error_class;

pub use error_class::{ErrorClass, METADATA_KEY as ERROR_CLASS_METADATA};
pub use prost;
pub use prost_types;

/// Converts a wall-clock time into a protobuf timestamp.
pub fn timestamp(time: std::time::SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

/// The current time as a protobuf timestamp.
pub fn now() -> prost_types::Timestamp {
    timestamp(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::v1;
    use prost::Message;

    #[test]
    fn dispatch_round_trips_through_bytes() {
        let dispatch = v1::TaskDispatch {
            tenant: "acme".into(),
            run_id: "r1".into(),
            task_id: "t1".into(),
            attempt: 3,
            role: "generalist".into(),
            dispatched_at: Some(super::now()),
        };
        let decoded = v1::TaskDispatch::decode(dispatch.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, dispatch);
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(v1::TaskReport::decode(&b"\xff\xff\xff\xff"[..]).is_err());
    }
}
