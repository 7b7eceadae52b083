//! `arbitrary` support for field types the `arbitrary` crate does not cover (`Bytes`), used by
//! the fuzz targets through the `arbitrary` feature.

use crate::string::MqttString;
use crate::topic::TopicName;
use crate::types::{QoS, SubscriptionId};
use arbitrary::{Arbitrary, Result, Unstructured};
use bytes::Bytes;
use std::num::{NonZeroU16, NonZeroU32};

/// Arbitrary binary data, kept short so inputs stay small.
pub(crate) fn bytes(u: &mut Unstructured<'_>) -> Result<Bytes> {
    let len = u.int_in_range(0..=64)?;
    Ok(Bytes::copy_from_slice(u.bytes(len.min(u.len()))?))
}

/// Field values the property macro can generate.
pub(crate) trait ArbField: Sized {
    fn arb(u: &mut Unstructured<'_>) -> Result<Self>;
}

impl ArbField for Bytes {
    fn arb(u: &mut Unstructured<'_>) -> Result<Self> {
        bytes(u)
    }
}

macro_rules! via_arbitrary {
    ($($t:ty),*) => {
        $(impl ArbField for $t {
            fn arb(u: &mut Unstructured<'_>) -> Result<Self> {
                <$t as Arbitrary>::arbitrary(u)
            }
        })*
    };
}
via_arbitrary!(u16, u32, bool, NonZeroU16, NonZeroU32, MqttString, TopicName, QoS, SubscriptionId);

impl<T: ArbField> ArbField for Option<T> {
    fn arb(u: &mut Unstructured<'_>) -> Result<Self> {
        Ok(if u.arbitrary()? { Some(T::arb(u)?) } else { None })
    }
}
