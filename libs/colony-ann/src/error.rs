/// Why a vector was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnError {
    /// The vector's length is not the index's dimension count.
    #[error("the vector has {got} dimensions but the index holds {expected}")]
    Dimension {
        /// The index's dimension count.
        expected: usize,
        /// The vector's length.
        got: usize,
    },
    /// A value is NaN or infinite; it would poison every score it takes part in.
    #[error("value {position} of the vector is not finite")]
    NonFinite {
        /// Where in the vector the first such value is.
        position: usize,
    },
    /// The index already holds as many vectors (live or removed but not yet compacted) as its
    /// 32-bit node numbers can address.
    #[error("the index is full")]
    Full,
}
