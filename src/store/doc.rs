//! How a store keeps an order (its doc: Redis's order hash field `doc`, the embedded store's
//! `orders` table): its JSON, or, with `database.compress_orders`, that JSON compressed by zstd
//! with a dictionary built into the binary (about a fifth of the bytes). Every byte of a Redis
//! script's arguments is hashed by Redis's Lua and copied into its append-only file, and every
//! byte the embedded store keeps is written to its file: a smaller doc costs Redis less CPU, lets
//! each `fsync` cover more orders and makes the embedded file several times smaller. Either form
//! is read whatever the option says, so nodes with and without it share a Redis, and a data dir
//! keeps working when the option changes. With `database.payload_apart`, a store keeps an
//! order's payload apart, written once when the order is created (its own doc,
//! [`write_payload`]), and the order's doc leaves it out. With `database.split_orders`, Redis
//! keeps an order split ([`StoredForm::Split`]): its payload apart as above, and its head, its
//! steps and the rest ([`write_split`]) as JSON of their own, never compressed.

use super::corrupt;
use crate::order::{
    write_order, write_order_apart, write_split_head, write_split_rest, write_split_step, Order,
    Payload, StepEntry, StoredForm,
};
use crate::store::StoreError;
use std::borrow::Cow;
use std::cell::RefCell;
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use zstd::bulk::{Compressor, Decompressor};
use zstd::dict::{DecoderDictionary, EncoderDictionary};

/// The dictionary, made with `zstd --train --maxdict=8192 --dictID=1328623233` from about
/// 15,500 orders as stored through their steps: 7,000 from `order-process bench` runs with none,
/// half and all of their orders failing a simulated step, 8,500 through http steps whose service
/// answered with outputs, busy and failed attempts and refusals (node ids and payloads varied).
/// A compressed doc names it by its id: it never changes, and a new dictionary would come with a
/// new id, this one still read.
const DICTIONARY: &[u8] = include_bytes!("order-doc.dict");

/// [`DICTIONARY`]'s id, as its header and every doc compressed with it give it.
const DICTIONARY_ID: u32 = 1_328_623_233;

/// zstd's level 1: with this dictionary, level 2 was no smaller, and the negative (faster)
/// levels were at most a quarter faster and up to half larger.
const LEVEL: i32 = 1;

/// The first bytes of a zstd frame; a JSON doc starts with `{`.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The largest doc a compressed one may claim to hold: far above any order (its payload is
/// limited by `server.max_body_bytes`, which is at most half of this), so a damaged frame
/// cannot make a read allocate more.
pub const MAX_DOC: u64 = 64 << 20;

/// How many bytes an order's JSON is written into at first: an order through all its steps
/// (about 1.5 KB) fits, so the buffer does not grow by reallocation while it is written.
pub const DOC_CAPACITY: usize = 2048;

fn encoder_dictionary() -> &'static EncoderDictionary<'static> {
    static PREPARED: OnceLock<EncoderDictionary<'static>> = OnceLock::new();
    PREPARED.get_or_init(|| EncoderDictionary::copy(DICTIONARY, LEVEL))
}

fn decoder_dictionary() -> &'static DecoderDictionary<'static> {
    static PREPARED: OnceLock<DecoderDictionary<'static>> = OnceLock::new();
    PREPARED.get_or_init(|| DecoderDictionary::copy(DICTIONARY))
}

/// A thread's compressor and the JSON it compresses, kept so that each write reuses them.
struct Compressing {
    compressor: Compressor<'static>,
    json: Vec<u8>,
    out: Vec<u8>,
}

thread_local! {
    static COMPRESSING: RefCell<Option<Compressing>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
}

/// `order`'s doc, in a buffer of its own.
pub fn encode(order: &Order, compress: bool) -> Result<Vec<u8>, StoreError> {
    let mut bytes = Vec::with_capacity(DOC_CAPACITY);
    write(&mut bytes, order, compress)?;
    Ok(bytes)
}

/// Appends `order`'s doc to `bytes`: its JSON (without its payload when the store keeps that
/// apart, see [`write_payload`]), compressed when `compress` says so.
pub fn write(bytes: &mut Vec<u8>, order: &Order, compress: bool) -> Result<(), StoreError> {
    let json = |out: &mut Vec<u8>| {
        if order.payload.is_apart() {
            write_order_apart(out, order)
        } else {
            write_order(out, order)
        }
        .map_err(corrupt)
    };
    if !compress {
        return json(bytes);
    }
    compressed(bytes, json, |_| true)
}

/// The doc of an order's payload kept apart, in a buffer of its own (see [`write_payload`]).
pub fn encode_payload(payload: &Payload, compress: bool) -> Result<Vec<u8>, StoreError> {
    let mut bytes = Vec::new();
    write_payload(&mut bytes, payload, compress)?;
    Ok(bytes)
}

/// The smallest payload worth trying to compress: a compressed one carries a frame header and
/// the dictionary's id, so one this small never comes out smaller.
const COMPRESSIBLE_PAYLOAD: usize = 32;

/// Appends the doc of an order's payload kept apart from the rest of the order: its JSON, or,
/// when `compress` says so and that is smaller, that JSON compressed.
pub fn write_payload(
    bytes: &mut Vec<u8>,
    payload: &Payload,
    compress: bool,
) -> Result<(), StoreError> {
    let text = payload.text().map_err(corrupt)?.as_bytes();
    let plain = |out: &mut Vec<u8>| {
        out.extend_from_slice(text);
        Ok(())
    };
    if !compress || text.len() < COMPRESSIBLE_PAYLOAD {
        return plain(bytes);
    }
    compressed(bytes, plain, |size| size < text.len())
}

/// Appends the JSON `json` writes, compressed; or, when `worth` says the compressed size is not
/// worth it, the JSON as it is.
fn compressed(
    bytes: &mut Vec<u8>,
    json: impl FnOnce(&mut Vec<u8>) -> Result<(), StoreError>,
    worth: impl FnOnce(usize) -> bool,
) -> Result<(), StoreError> {
    COMPRESSING.with(|cell| {
        let mut cell = cell.borrow_mut();
        let compressing = match &mut *cell {
            Some(compressing) => compressing,
            empty => empty.insert(Compressing {
                compressor: Compressor::with_prepared_dictionary(encoder_dictionary())
                    .map_err(|error| corrupt(format_args!("zstd: {error}")))?,
                json: Vec::with_capacity(DOC_CAPACITY),
                out: Vec::new(),
            }),
        };
        compressing.json.clear();
        json(&mut compressing.json)?;
        compressing.out.clear();
        compressing
            .out
            .reserve(zstd::zstd_safe::compress_bound(compressing.json.len()));
        compressing
            .compressor
            .compress_to_buffer(&compressing.json[..], &mut compressing.out)
            .map_err(|error| corrupt(format_args!("zstd: {error}")))?;
        if worth(compressing.out.len()) {
            bytes.extend_from_slice(&compressing.out);
        } else {
            bytes.extend_from_slice(&compressing.json);
        }
        Ok(())
    })
}

/// The order a doc holds, in either form. `payload` is the doc of its payload where the store
/// keeps that apart (see [`write_payload`]): the order's doc then has none, and the order read
/// is marked so, so that its later writes leave it out too. A doc that holds its payload all
/// the same (it never changes) is read as it is.
pub fn read(doc: &[u8], payload: Option<&[u8]>) -> Result<Order, StoreError> {
    let order: Order = serde_json::from_slice(&json_of(doc)?).map_err(corrupt)?;
    let order = counted(order)?;
    let Some(payload) = payload else {
        if order.lacks_payload() {
            return Err(StoreError::Corrupt(
                "order doc without a payload, and none kept apart".into(),
            ));
        }
        return Ok(order);
    };
    given_payload(order, payload)
}

/// `order`, unless its revision or epoch is at the largest number it can be: no order's writes
/// or owners come near it, so the record was changed outside the node, and no next write could
/// be counted past it.
fn counted(order: Order) -> Result<Order, StoreError> {
    if order.revision == u64::MAX || order.epoch == u64::MAX {
        return Err(StoreError::Corrupt(format!(
            "revision {} or epoch {} at the largest number it can be",
            order.revision, order.epoch
        )));
    }
    Ok(order)
}

/// `order`, read without its payload or with it, with the payload kept apart as `payload`
/// (its doc) and marked so.
fn given_payload(mut order: Order, payload: &[u8]) -> Result<Order, StoreError> {
    if order.lacks_payload() {
        let value: serde_json::Value = serde_json::from_slice(&json_of(payload)?)
            .map_err(|error| corrupt(format_args!("payload kept apart: {error}")))?;
        order.payload = Arc::new(Payload::from(value));
    }
    order.payload.set_apart();
    Ok(order)
}

/// The parts of an order kept split (see [`StoredForm::Split`]): what never changes, what
/// each write changes, and each step, in its order.
#[derive(Clone, Copy, Debug)]
pub struct Split<'a> {
    pub head: &'a [u8],
    pub rest: &'a [u8],
    pub steps: &'a [&'a [u8]],
}

/// The order whose split parts are `split` (see [`write_split`]), its payload kept apart as
/// `payload` (its doc).
pub fn read_split(split: Split<'_>, payload: &[u8]) -> Result<Order, StoreError> {
    let Split { head, rest, steps } = split;
    let size = head.len() + rest.len() + steps.iter().map(|step| step.len() + 1).sum::<usize>();
    let mut json = Vec::with_capacity(size + 16);
    json.push(b'{');
    json.extend_from_slice(head);
    json.push(b',');
    json.extend_from_slice(rest);
    json.extend_from_slice(b",\"steps\":[");
    for (index, step) in steps.iter().enumerate() {
        if index > 0 {
            json.push(b',');
        }
        json.extend_from_slice(step);
    }
    json.extend_from_slice(b"]}");
    let order: Order = serde_json::from_slice(&json)
        .map_err(|error| corrupt(format_args!("split order: {error}")))?;
    let order = given_payload(counted(order)?, payload)?;
    order.payload.set_form(StoredForm::Split);
    Ok(order)
}

/// Appends what a split order keeps at each of its writes (see [`write_split_rest`]).
pub fn write_split(bytes: &mut Vec<u8>, order: &Order) -> Result<(), StoreError> {
    write_split_rest(bytes, order).map_err(corrupt)
}

/// Appends what a split order keeps of itself that never changes (see [`write_split_head`]).
pub fn write_head(bytes: &mut Vec<u8>, order: &Order) -> Result<(), StoreError> {
    write_split_head(bytes, order).map_err(corrupt)
}

/// Appends one step of a split order.
pub fn write_step(bytes: &mut Vec<u8>, step: &StepEntry) -> Result<(), StoreError> {
    write_split_step(bytes, step).map_err(corrupt)
}

/// The JSON a doc (of an order, or of a payload kept apart) holds, in either form.
fn json_of(doc: &[u8]) -> Result<Cow<'_, [u8]>, StoreError> {
    if !doc.starts_with(&ZSTD_MAGIC) {
        return Ok(Cow::Borrowed(doc));
    }
    if zstd::zstd_safe::get_dict_id_from_frame(doc) != NonZeroU32::new(DICTIONARY_ID) {
        return Err(StoreError::Corrupt(
            "doc compressed with an unknown dictionary (written by a later version?)".into(),
        ));
    }
    let size = match zstd::zstd_safe::get_frame_content_size(doc) {
        Ok(Some(size)) if size <= MAX_DOC => size,
        _ => {
            return Err(StoreError::Corrupt(
                "compressed doc of no valid size".into(),
            ))
        }
    };
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let decompressor = match &mut *cell {
            Some(decompressor) => decompressor,
            empty => empty.insert(
                Decompressor::with_prepared_dictionary(decoder_dictionary())
                    .map_err(|error| corrupt(format_args!("zstd: {error}")))?,
            ),
        };
        let capacity = usize::try_from(size).map_err(corrupt)?;
        decompressor
            .decompress(doc, capacity)
            .map(Cow::Owned)
            .map_err(|error| corrupt(format_args!("compressed doc: {error}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::{apply, Event, OrderId, Step};
    use chrono::{TimeZone, Utc};

    fn order() -> Order {
        let at = Utc.with_ymd_and_hms(2026, 12, 4, 11, 52, 18).unwrap();
        let id = OrderId::parse_str("01a240e5-e640-7299-8190-1a201d7aa59e").unwrap();
        let node = "85bf69fa-a1a9-4b65-b50a-31f3894547e0";
        let mut order = Order::new(
            id,
            "alice".into(),
            serde_json::json!({"sku": 7}),
            node.into(),
            at,
        );
        for step in [Step::Scheduling, Step::PreProcessing] {
            let output = None;
            order = apply(&order, Event::StepSucceeded { step, output }, at).unwrap();
        }
        let (step, reason) = (Step::Processing, "out of stock".to_string());
        apply(&order, Event::StepFailed { step, reason }, at).unwrap()
    }

    fn json(order: &Order) -> Vec<u8> {
        let mut bytes = Vec::new();
        write(&mut bytes, order, false).unwrap();
        bytes
    }

    #[test]
    fn the_dictionary_carries_the_id_docs_are_checked_against() {
        assert_eq!(
            zstd::zstd_safe::get_dict_id_from_dict(DICTIONARY),
            NonZeroU32::new(DICTIONARY_ID)
        );
    }

    #[test]
    fn a_compressed_doc_reads_back_as_the_order_and_is_smaller() {
        let order = order();
        let mut bytes = b"before".to_vec();
        write(&mut bytes, &order, true).unwrap();
        let doc = &bytes[b"before".len()..];
        assert!(doc.starts_with(&ZSTD_MAGIC));
        assert!(doc.len() * 2 < json(&order).len(), "{} bytes", doc.len());
        assert_eq!(json(&read(doc, None).unwrap()), json(&order));
        // The same order makes the same bytes: a retried write compares equal to the stored one.
        let mut again = Vec::new();
        write(&mut again, &order, true).unwrap();
        assert_eq!(again, doc);
    }

    #[test]
    fn a_json_doc_reads_as_before() {
        let order = order();
        assert_eq!(json(&read(&json(&order), None).unwrap()), json(&order));
    }

    #[test]
    fn a_revision_or_epoch_no_write_can_follow_is_corrupt() {
        for (revision, epoch) in [(u64::MAX, 1), (3, u64::MAX)] {
            let mut order = order();
            (order.revision, order.epoch) = (revision, epoch);
            assert!(
                matches!(read(&json(&order), None), Err(StoreError::Corrupt(_))),
                "revision {revision}, epoch {epoch}"
            );
        }
        let mut order = order();
        order.revision = u64::MAX - 1;
        assert!(
            read(&json(&order), None).is_ok(),
            "one more write can follow"
        );
    }

    #[test]
    fn a_damaged_compressed_doc_is_corrupt_not_a_panic() {
        let mut doc = Vec::new();
        write(&mut doc, &order(), true).unwrap();
        for cut in [4, 6, doc.len() / 2, doc.len() - 1] {
            assert!(
                matches!(read(&doc[..cut], None), Err(StoreError::Corrupt(_))),
                "cut at {cut}"
            );
        }
        let mut flipped = doc.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x55;
        assert!(read(&flipped, None).is_err());
        // Compressed without the dictionary, or with another: not ours to read.
        let plain = zstd::bulk::compress(&json(&order()), 1).unwrap();
        assert!(matches!(read(&plain, None), Err(StoreError::Corrupt(_))));
    }

    /// An order's doc and its payload's, as a store that keeps the payload apart writes them.
    fn apart(order: &Order, compress: bool) -> (Vec<u8>, Vec<u8>) {
        order.payload.set_apart();
        let (mut doc, mut payload) = (Vec::new(), Vec::new());
        write(&mut doc, order, compress).unwrap();
        write_payload(&mut payload, &order.payload, compress).unwrap();
        (doc, payload)
    }

    #[test]
    fn an_order_apart_from_its_payload_reads_back_whole_and_stays_apart() {
        for compress in [false, true] {
            let order = order();
            let whole = json(&order);
            let (doc, payload) = apart(&order, compress);
            assert_eq!(doc.starts_with(&ZSTD_MAGIC), compress);
            let text = json_of(&doc).unwrap();
            assert!(
                !String::from_utf8_lossy(&text).contains("payload"),
                "{text:?}"
            );
            let read = read(&doc, Some(&payload)).unwrap();
            assert!(read.payload.is_apart());
            assert_eq!(read, order);
            // Its next write leaves the payload out again; in full it is the order's JSON.
            let mut again = Vec::new();
            write(&mut again, &read, compress).unwrap();
            assert_eq!(again, doc);
            let mut full = Vec::new();
            write_order(&mut full, &read).unwrap();
            assert_eq!(full, whole);
        }
    }

    #[test]
    fn a_payload_is_compressed_only_when_that_makes_it_smaller() {
        let small = Payload::from(serde_json::json!({"sku": 7}));
        let mut bytes = Vec::new();
        write_payload(&mut bytes, &small, true).unwrap();
        assert_eq!(bytes, br#"{"sku":7}"#);
        // Long enough to try, too random to come out smaller.
        let random = Payload::from(serde_json::json!({"k": "q8Zr1x0Lm3Vb7Tn2Pw5Yc9Hd4Jf6Gs"}));
        let mut bytes = Vec::new();
        write_payload(&mut bytes, &random, true).unwrap();
        assert_eq!(bytes, random.text().unwrap().as_bytes());
        let large = Payload::from(serde_json::json!({"note": "abc ".repeat(500)}));
        let mut bytes = Vec::new();
        write_payload(&mut bytes, &large, true).unwrap();
        assert!(bytes.starts_with(&ZSTD_MAGIC));
        assert!(bytes.len() < 200, "{} bytes", bytes.len());
        assert_eq!(
            json_of(&bytes).unwrap().as_ref(),
            large.text().unwrap().as_bytes()
        );
    }

    #[test]
    fn a_payload_apart_that_does_not_read_is_corrupt() {
        let (doc, payload) = apart(&order(), false);
        let corrupt =
            |payload: &[u8]| matches!(read(&doc, Some(payload)), Err(StoreError::Corrupt(_)));
        // Two values, one cut short, a value and more, nothing.
        assert!(corrupt(br#"{"a":1} {"b":2}"#));
        assert!(corrupt(&payload[..payload.len() - 1]));
        assert!(corrupt(br#"1,"extra":2"#));
        assert!(corrupt(b""));
        // A doc without its payload, and none apart.
        assert!(matches!(read(&doc, None), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn a_doc_that_holds_its_payload_too_reads_as_it_is_and_leaves_it_out_after() {
        let order = order();
        let whole = json(&order);
        let (doc, _) = apart(&order, false);
        let read = read(&whole, Some(br#"{"sku":7}"#)).unwrap();
        assert!(read.payload.is_apart());
        assert_eq!(read, order);
        let mut again = Vec::new();
        write(&mut again, &read, false).unwrap();
        assert_eq!(again, doc);
    }
}
