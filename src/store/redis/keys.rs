//! The Redis key layout, all keys under `op:`, one layout for a single Redis and for Redis
//! Cluster alike.
//!
//! Orders are spread over [`SHARDS`] virtual shards. Every key an order's scripts touch carries
//! its shard's hash tag, `{s:NN:J}`, so each script and each pipeline of one shard stays in one
//! hash slot (Redis Cluster runs a script only on keys of one slot). `J` is the first number that
//! puts shard `NN` in its own 64th of the 16,384 slots (see [`shard_tag`]), so that slot ranges of
//! about equal size, as `redis-cli --cluster create` makes them, hold about as many shards each.
//! Order storage, per shard (`{s:NN:J}` written `{s:NN}` below):
//!
//! - `op:{s:NN}:order:{id}`: hash with `doc` (the order JSON, compressed with zstd when the node
//!   that wrote it has `database.compress_orders`), `owner`, `epoch`, `user`,
//!   `cancel`, `state` (`forward`, `rolling_back`, `finished`) and `step`; and `payload` (the
//!   payload's JSON, compressed the same way when that is smaller) when the node that created
//!   the order has `database.payload_apart`: `doc` then leaves the payload out. When that node
//!   has `database.split_orders`, the order is split (see `split`): `payload` as above, `head`
//!   (what never changes of it), `s0` to `s5` (its steps), `sv` (the revision they were last
//!   written at), and `doc` holds the rest. `owner`, `epoch` and `cancel` in the hash are the
//!   truth; the copies inside `doc` are refreshed on read.
//! - `op:{s:NN}:owned:{node}`: set of the node's unfinished orders of the shard.
//! - `op:{s:NN}:user:{user}`: sorted set (all scores 0) of `{created µs, 20 digits}-{id}`, for
//!   listing; a user's listing merges those of all shards.
//! - `op:{s:NN}:state:{code}:{user}`: sorted set like the user index, of the user's orders of
//!   the shard in one state: `code` is the order's rollback state (`rollback-complete`,
//!   `rollback-incomplete`) when it has one, `running` at any of the four work steps (see
//!   [`RUNNING`]), else its step (`Completed`, `Failed`). The order hash names the one it is
//!   filed under in `filed`; what listings filtered by step or rollback state read, once
//!   [`STATE_INDEXED`] says every order is filed. An earlier version filed orders at a work step
//!   under the step's own code (`Scheduling`, …, `Post-Processing`): listings read those too,
//!   and an order leaves one at its next transition.
//! - `op:{s:NN}:idem:{user}:{key}`: the order an idempotency key created, expiring after 24 h,
//!   or with the order if that comes first (the order hash names it in `idem`). A user name
//!   with a `:` is spelled otherwise there (see [`idem_user`]).
//! - `op:{s:NN}:finished`: sorted set of `{id} {user index member} {user}` scored with when that
//!   finished order expires (ms, Redis's clock): what the retention pass takes user index
//!   entries out by. A finished order's hash expires `orders.retention` after it finished.
//! - `op:{s:NN}:parked`: sorted set (all scores 0) of the ids of orders whose rollback is
//!   parked, kept by the scripts that finish, re-open and expire an order.
//! - `op:{s:NN}:aside`: hash order id → why it was set aside (JSON), for orders whose record
//!   cannot be read; they are in no owned set.
//! - `op:{s:NN}:probe`: written by health checks, so they see a Redis that answers but refuses
//!   writes (on every primary of a Redis Cluster).
//!
//! Which shard: [`shard_of`] an order id is its last byte modulo [`SHARDS`] (random in a UUID).
//! An order created with an idempotency key goes to the shard of the user and key
//! ([`shard_of_key`]): its id, given before it is stored, has its last byte changed to that shard
//! ([`in_shard`]), so the key and the order share a slot and anyone can find either.
//!
//! Cluster coordination, all under one hash tag `{c}` (one slot), so the scripts that take
//! leases and register nodes touch one slot:
//!
//! - `op:{c}:nodes`: hash node id → HTTP address of every node that ever started.
//! - `op:{c}:alive:{node}`, `op:{c}:leader`, `op:{c}:leader:fence`: the liveness and leader
//!   leases, and the leader's fencing counter.
//! - `op:{c}:indexed:state`: set by the index repair once a pass of it filed every order in
//!   the state indexes (a Redis written by an earlier version has orders that are not).
//! - `op:{c}:alive:until`: hash node id → when its liveness lease as last renewed expires, in ms
//!   of Redis's clock, so any leader can tell how long a lease has been expired.
//! - `op:{c}:forgotten`: sorted set of the nodes the leader took out of the registry, scored with
//!   when (ms, Redis's clock), kept an hour: an order that lands as one's own later is found.

use crate::order::{OrderId, RollbackState, Step};
use std::borrow::Cow;
use uuid::Uuid;

/// How many shards orders are spread over. Fixed: an order's shard is computed from its id, so
/// this never changes for stored data. 64 divides 256, so every last byte maps evenly.
pub const SHARDS: u16 = 64;

/// Every registered node and its HTTP address.
pub const NODES: &str = "op:{c}:nodes";
/// Hash node id → when its liveness lease, as last renewed, expires (ms, Redis's clock).
pub const ALIVE_UNTIL: &str = "op:{c}:alive:until";
/// Sorted set of the nodes taken out of the registry, scored with when (ms, Redis's clock).
pub const FORGOTTEN: &str = "op:{c}:forgotten";
/// The leader lease: `{node}:{term id}` of the holder.
pub const LEADER: &str = "op:{c}:leader";
/// The latest fencing token, one per leader term.
pub const LEADER_FENCE: &str = "op:{c}:leader:fence";

/// Present once an index repair pass went through every order: the state indexes are complete.
pub const STATE_INDEXED: &str = "op:{c}:indexed:state";

/// A node's liveness lease.
pub fn alive_key(node: &str) -> String {
    format!("op:{{c}}:alive:{node}")
}

/// The shard of order `id`.
pub fn shard_of(id: OrderId) -> u16 {
    u16::from(id.as_bytes()[15]) % SHARDS
}

/// The shard of the order a user's idempotency key creates: FNV-1a of user and key, so every
/// node and version computes the same.
pub fn shard_of_key(user: &str, key: &str) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in user.bytes().chain([0]).chain(key.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    u16::try_from(hash % u64::from(SHARDS)).unwrap_or(0)
}

/// `id` with its last byte changed so that it is in `shard`; the rest (timestamp, version,
/// variant) stays.
pub fn in_shard(id: OrderId, shard: u16) -> OrderId {
    let mut bytes = *id.as_bytes();
    let last = u16::from(bytes[15]);
    let moved = last - last % SHARDS + shard % SHARDS;
    bytes[15] = u8::try_from(moved).unwrap_or(bytes[15]);
    OrderId::from_bytes(bytes)
}

/// Hash slots in a Redis Cluster.
const SLOTS: u16 = 16_384;

/// The hash slot Redis Cluster gives a key whose hash tag is `tag`.
fn slot_of_tag(tag: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % SLOTS
}

/// The hash tag of `shard`: `s:NN:J`, with `J` the first number from 0 that gives it a slot in
/// the shard's own band of `16384 / SHARDS` slots. Fixed by this rule for every version.
pub fn shard_tag(shard: u16) -> &'static str {
    let prefix = shard_prefix(shard);
    prefix
        .get(TAG_AT..prefix.len().saturating_sub(2))
        .unwrap_or("")
}

/// Where the tag starts in a shard's prefix (after `op:{`).
const TAG_AT: usize = 4;

/// The prefix of every key of `shard`, `op:{tag}:` with its [`shard_tag`]: made once, so a key
/// is its prefix and its parts.
fn shard_prefix(shard: u16) -> &'static str {
    static PREFIXES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let prefixes = PREFIXES.get_or_init(|| {
        let band = SLOTS / SHARDS;
        shards()
            .map(|shard| {
                let wanted = shard * band..(shard + 1) * band;
                (0u32..)
                    .map(|j| format!("s:{shard:02}:{j}"))
                    .find(|tag| wanted.contains(&slot_of_tag(tag)))
                    .map(|tag| format!("op:{{{tag}}}:"))
                    .unwrap_or_default()
            })
            .collect()
    });
    prefixes
        .get(usize::from(shard % SHARDS))
        .map_or("", String::as_str)
}

/// The pieces of the key of `shard` made of `parts`: its prefix `op:{tag}:`, then the parts.
fn pieces<'a>(shard: u16, parts: &'a [&'a str]) -> impl Iterator<Item = &'a str> + Clone {
    std::iter::once(shard_prefix(shard)).chain(parts.iter().copied())
}

/// A key of `shard`: its prefix `op:{tag}:`, then `parts` one after another. Built in one
/// allocation of the right size, without the formatting machinery.
fn shard_key(shard: u16, parts: &[&str]) -> String {
    let pieces = pieces(shard, parts);
    let mut key = String::with_capacity(pieces.clone().map(str::len).sum());
    key.extend(pieces);
    key
}

/// Writes the key of `shard` made of `parts` (one of the `…_parts` below), spelled as the
/// `…_key` functions spell it, at the end of `into`: how a write of the group commit takes its
/// keys.
pub fn write_shard_key(into: &mut Vec<u8>, shard: u16, parts: &[&str]) {
    for piece in pieces(shard, parts) {
        into.extend_from_slice(piece.as_bytes());
    }
}

/// The hash of order `id`.
pub fn order_key(id: OrderId) -> String {
    let mut text = Uuid::encode_buffer();
    let id_text = id.hyphenated().encode_lower(&mut text);
    shard_key(shard_of(id), &order_parts(id_text))
}

/// The parts of [`order_key`], with the id as hyphenated lowercase text.
pub fn order_parts(id: &str) -> [&str; 2] {
    ["order:", id]
}

/// `node`'s unfinished orders of `shard`.
pub fn owned_key(shard: u16, node: &str) -> String {
    shard_key(shard, &owned_parts(node))
}

/// The parts of [`owned_key`].
pub fn owned_parts(node: &str) -> [&str; 2] {
    ["owned:", node]
}

/// `user`'s orders of `shard`, for listing.
pub fn user_key(shard: u16, user: &str) -> String {
    shard_key(shard, &user_parts(user))
}

/// The parts of [`user_key`].
pub fn user_parts(user: &str) -> [&str; 2] {
    ["user:", user]
}

/// `user`'s orders of `shard` in state `code` (see [`state_code`]), for filtered listings. The
/// code comes before the user, so no user name makes one user's key another's.
pub fn state_key(shard: u16, code: &str, user: &str) -> String {
    shard_key(shard, &state_parts(code, user))
}

/// The parts of [`state_key`].
pub fn state_parts<'a>(code: &'a str, user: &'a str) -> [&'a str; 4] {
    ["state:", code, ":", user]
}

/// The state index code of the orders at any of the four work steps. One index for them all,
/// so that a transition from one work step to the next touches no index (listings filtered by
/// a work step read the few running orders and keep that step's).
pub const RUNNING: &str = "running";

/// The state index code of an order at `step` with `rollback`: its rollback state when it has
/// one (only failed orders do, at [`Step::Failed`]), [`RUNNING`] at a work step, else its step.
pub fn state_code(step: Step, rollback: Option<RollbackState>) -> &'static str {
    match rollback {
        Some(RollbackState::Complete) => "rollback-complete",
        Some(RollbackState::Incomplete) => "rollback-incomplete",
        None if Step::WORK.contains(&step) => RUNNING,
        None => step.as_str(),
    }
}

/// The state index codes an order can have once finished, which its retention can delete it in.
pub const FINISHED_CODES: [&str; 3] = ["Completed", "rollback-complete", "rollback-incomplete"];

/// What idempotency key `key` of `user` created.
pub fn idem_key(user: &str, key: &str) -> String {
    shard_key(shard_of_key(user, key), &idem_parts(&idem_user(user), key))
}

/// The parts of [`idem_key`], a key of shard [`shard_of_key`], with the user as
/// [`idem_user`] spells it: `idem:{user}:{key}`.
pub fn idem_parts<'a>(user: &'a str, key: &'a str) -> [&'a str; 4] {
    ["idem:", user, ":", key]
}

/// `user` as its idempotency keys spell it. Both the user and the key may hold a `:`, so
/// `idem:{user}:{key}` alone would make user `a`'s key `b:c` user `a:b`'s key `c`. A user with
/// no `:` (nearly every one) is spelled as it is, as it was before this rule; any other is
/// spelled `:` and then its name with `%` and `:` written `%25` and `%3A`. That
/// spelling starts with the `:` no plain name (never empty) does, and holds no `:` after it,
/// so the first `:` after it ends the user and no two (user, key) pairs share a key.
pub fn idem_user(user: &str) -> Cow<'_, str> {
    if !user.is_empty() && !user.contains(':') {
        return Cow::Borrowed(user);
    }
    let mut spelled = String::with_capacity(user.len() + 8);
    spelled.push(':');
    for c in user.chars() {
        match c {
            '%' => spelled.push_str("%25"),
            ':' => spelled.push_str("%3A"),
            c => spelled.push(c),
        }
    }
    Cow::Owned(spelled)
}

/// The finished orders of `shard` by when they expire.
pub fn finished_key(shard: u16) -> String {
    shard_key(shard, &FINISHED_PARTS)
}

/// The parts of [`finished_key`].
pub const FINISHED_PARTS: [&str; 1] = ["finished"];

/// The orders of `shard` whose rollback is parked.
pub fn parked_key(shard: u16) -> String {
    shard_key(shard, &PARKED_PARTS)
}

/// The parts of [`parked_key`].
pub const PARKED_PARTS: [&str; 1] = ["parked"];

/// The orders of `shard` set aside because their record cannot be read.
pub fn aside_key(shard: u16) -> String {
    shard_key(shard, &["aside"])
}

/// What health checks write in `shard`.
pub fn probe_key(shard: u16) -> String {
    shard_key(shard, &["probe"])
}

/// What a `SCAN` for the order hashes of `shard` matches; `None` for those of every shard.
pub fn order_pattern(shard: Option<u16>) -> String {
    match shard {
        Some(shard) => shard_key(shard, &["order:*"]),
        None => "op:{s:*}:order:*".to_string(),
    }
}

/// Every shard, in order.
pub fn shards() -> impl Iterator<Item = u16> + Clone {
    0..SHARDS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_and_its_keys_share_a_hash_tag() {
        let id = OrderId::now_v7();
        let shard = shard_of(id);
        let tag = format!("{{{}}}", shard_tag(shard));
        for key in [
            order_key(id),
            owned_key(shard, "node-a"),
            user_key(shard, "alice"),
            state_key(shard, "Completed", "alice"),
            finished_key(shard),
            parked_key(shard),
            aside_key(shard),
        ] {
            assert!(key.contains(&tag), "{key} lacks {tag}");
        }
    }

    #[test]
    fn keys_are_spelled_as_the_layout_says() {
        let id = OrderId::now_v7();
        let shard = shard_of(id);
        let tag = shard_tag(shard);
        assert_eq!(order_key(id), format!("op:{{{tag}}}:order:{id}"));
        assert_eq!(owned_key(shard, "n1"), format!("op:{{{tag}}}:owned:n1"));
        assert_eq!(user_key(shard, "al"), format!("op:{{{tag}}}:user:al"));
        assert_eq!(
            state_key(shard, "Failed", "al"),
            format!("op:{{{tag}}}:state:Failed:al")
        );
        assert_eq!(finished_key(shard), format!("op:{{{tag}}}:finished"));
        assert_eq!(parked_key(shard), format!("op:{{{tag}}}:parked"));
        assert_eq!(aside_key(shard), format!("op:{{{tag}}}:aside"));
        assert_eq!(probe_key(shard), format!("op:{{{tag}}}:probe"));
        assert_eq!(order_pattern(Some(shard)), format!("op:{{{tag}}}:order:*"));
        let key_tag = shard_tag(shard_of_key("al", "k:1"));
        assert_eq!(
            idem_key("al", "k:1"),
            format!("op:{{{key_tag}}}:idem:al:k:1")
        );
        let key_tag = shard_tag(shard_of_key("a:l%", "k:1"));
        assert_eq!(
            idem_key("a:l%", "k:1"),
            format!("op:{{{key_tag}}}:idem::a%3Al%25:k:1")
        );
    }

    #[test]
    fn no_two_users_and_keys_share_an_idempotency_key() {
        let names = [
            "", ":", "a", "a:", ":a", "a:b", "b", "b:c", "c", "a%3Ab", "%3A", "%", "%25",
        ];
        let mut seen = std::collections::HashMap::new();
        for user in names {
            for key in names {
                let spelled = idem_parts(&idem_user(user), key).concat();
                if let Some(other) = seen.insert(spelled.clone(), (user, key)) {
                    panic!("{other:?} and {:?} both spell {spelled}", (user, key));
                }
            }
        }
        assert_eq!(idem_user("alice"), "alice");
    }

    #[test]
    fn the_finished_codes_are_those_of_finished_orders() {
        assert_eq!(
            FINISHED_CODES,
            [
                state_code(Step::Completed, None),
                state_code(Step::Failed, Some(RollbackState::Complete)),
                state_code(Step::Failed, Some(RollbackState::Incomplete)),
            ]
        );
        assert!(Step::ALL
            .iter()
            .all(|step| !state_code(*step, None).contains(':')));
        for step in Step::WORK {
            assert_eq!(state_code(step, None), RUNNING);
            assert_ne!(step.as_str(), RUNNING);
        }
    }

    #[test]
    fn an_id_moved_to_a_key_shard_keeps_its_version_and_is_found_there() {
        let id = OrderId::now_v7();
        for shard in shards() {
            let moved = in_shard(id, shard);
            assert_eq!(shard_of(moved), shard);
            assert_eq!(moved.get_version_num(), 7);
            assert_eq!(moved.as_bytes()[..15], id.as_bytes()[..15]);
        }
        let shard = shard_of_key("alice", "cart-7");
        assert_eq!(shard, shard_of_key("alice", "cart-7"));
        assert!(idem_key("alice", "cart-7").contains(&format!("{{{}}}", shard_tag(shard))));
    }

    #[test]
    fn stored_keys_keep_their_spelling() {
        // Keys already stored are found by these names: computed by the rule, fixed for good.
        for (shard, tag) in [
            (0, "s:00:363"),
            (1, "s:01:12"),
            (17, "s:17:373"),
            (63, "s:63:48"),
        ] {
            assert_eq!(shard_tag(shard), tag);
            assert_eq!(finished_key(shard), format!("op:{{{tag}}}:finished"));
        }
        let id = in_shard(OrderId::now_v7(), 17);
        assert_eq!(order_key(id), format!("op:{{s:17:373}}:order:{id}"));
        let mut written = b"x".to_vec();
        write_shard_key(&mut written, 63, &owned_parts("n1"));
        assert_eq!(written, b"xop:{s:63:48}:owned:n1");
    }

    #[test]
    fn each_shard_has_a_slot_in_its_own_band() {
        assert_eq!(slot_of_tag("123456789"), 0x31C3 % SLOTS, "CRC16/XMODEM");
        for shard in shards() {
            let slot = slot_of_tag(shard_tag(shard));
            assert_eq!(slot / (SLOTS / SHARDS), shard, "{}", shard_tag(shard));
            assert!(shard_tag(shard).starts_with(&format!("s:{shard:02}:")));
        }
        // Three even slot ranges (what `redis-cli --cluster create` makes) get 21 or 22 each.
        let mut counts = [0; 3];
        for shard in shards() {
            let slot = usize::from(slot_of_tag(shard_tag(shard)));
            counts[(slot * 3 / usize::from(SLOTS)).min(2)] += 1;
        }
        assert!(
            counts.iter().all(|&count| (21..=22).contains(&count)),
            "{counts:?}"
        );
    }

    #[test]
    fn new_ids_spread_over_every_shard() {
        let mut seen = vec![0usize; usize::from(SHARDS)];
        for _ in 0..20_000 {
            seen[usize::from(shard_of(OrderId::now_v7()))] += 1;
        }
        // 312 expected per shard; a shard this far off would mean a biased byte.
        assert!(
            seen.iter().all(|&count| (150..500).contains(&count)),
            "{seen:?}"
        );
    }
}
