//! The Lua scripts of the order store. Each is one atomic step on one order: its hash and the
//! index entries that change with it, so that no failure between two calls can leave an index
//! that disagrees with the order.

use deadpool_redis::redis::Script;

/// Commit a transition. KEYS: the order, the committer's owned set. ARGV: owner, epoch, doc,
/// aware of cancellation (1/0), state, step, order id, revision. Why a script: the owner/epoch
/// check and the write must be one atomic step, or a node that just lost the order could
/// overwrite its new owner's progress; a write must be newer than the stored revision, or one
/// delivered late (TCP retransmitting it after a network cut healed) would take the order back,
/// while the very write already stored (a retry after a lost answer) is done; and the order
/// leaves the committer's owned set in the same step when it finishes (never before) or turns
/// out not to be the committer's.
const COMMIT: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'cancel', 'rev')
if not cur[1] then
  redis.call('SREM', KEYS[2], ARGV[7])
  return 'missing'
end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then
  if cur[1] ~= ARGV[1] then redis.call('SREM', KEYS[2], ARGV[7]) end
  return 'not_owner'
end
local rev = tonumber(cur[4] or '0')
local new = tonumber(ARGV[8])
if new < rev or (new == rev and redis.call('HGET', KEYS[1], 'doc') ~= ARGV[3]) then
  return 'stale'
end
if cur[3] == '1' and ARGV[4] == '0' then return 'cancel' end
if new == rev then return 'ok' end
redis.call('HSET', KEYS[1], 'doc', ARGV[3], 'state', ARGV[5], 'step', ARGV[6], 'rev', ARGV[8])
if ARGV[5] == 'finished' then redis.call('SREM', KEYS[2], ARGV[7]) end
return 'ok'
";

/// Create an order with its index entries. KEYS: the order, its owner's owned set, its user's
/// index, and (optional) the idempotency key. ARGV: doc, owner, epoch, user, state, step, user
/// index member, order id, idempotency ttl (s), take over a key that holds no order id (1/0).
/// Returns {'ok'}; {'exists', current owner} when the id is taken; or {'key', id} when the
/// idempotency key names another id: nothing is written then. Why a script: the order and its
/// index entries are written together or not at all, so no dropped retry leaves an index entry
/// with no order; and of two requests that store the same id, exactly one wins.
const CREATE: &str = r"
if KEYS[4] then
  local earlier = redis.call('GET', KEYS[4])
  if earlier and earlier ~= ARGV[8] and ARGV[10] ~= '1' then
    return {'key', earlier}
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'exists', redis.call('HGET', KEYS[1], 'owner')}
end
redis.call('HSET', KEYS[1], 'doc', ARGV[1], 'owner', ARGV[2], 'epoch', ARGV[3], 'user', ARGV[4], 'state', ARGV[5], 'step', ARGV[6])
if ARGV[5] ~= 'finished' then redis.call('SADD', KEYS[2], ARGV[8]) end
redis.call('ZADD', KEYS[3], 0, ARGV[7])
if KEYS[4] then redis.call('SET', KEYS[4], ARGV[8], 'EX', ARGV[9]) end
return {'ok'}
";

/// Record a cancellation. KEYS[1] = order. ARGV: user. Returns nil for another user's or an
/// unknown order, else {doc, owner, epoch, cancel before}. Atomic so a cancellation is recorded
/// only on an order still running forward.
const CANCEL: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'user', 'state', 'cancel', 'doc', 'owner', 'epoch')
if not cur[1] or cur[1] ~= ARGV[1] then return false end
if cur[2] == 'forward' and cur[3] ~= '1' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
end
return {cur[4], cur[5], cur[6], cur[3] or '0'}
";

/// Move one order and its owned-set entry. KEYS: the order, `from`'s owned set, `to`'s owned
/// set. ARGV: from, to, order id, the owned sets' key prefix. Returns 'moved', 'mine' (already
/// `to`'s), 'finished', 'missing', or the current owner; in every case the order ends in the
/// owned set of whoever owns it, and in no other of the two. Why a script: the owner check and
/// the epoch bump must not interleave with a commit by the old owner, and the order must never
/// belong to `to` while listed only under `from` (a taker that fails then would never see it).
const REASSIGN: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'state')
redis.call('SREM', KEYS[2], ARGV[3])
if not cur[1] then return 'missing' end
if cur[2] == 'finished' then return 'finished' end
if cur[1] == ARGV[2] then
  redis.call('SADD', KEYS[3], ARGV[3])
  return 'mine'
end
if cur[1] ~= ARGV[1] then
  redis.call('SADD', ARGV[4] .. cur[1], ARGV[3])
  return cur[1]
end
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
return 'moved'
";

/// Re-open a parked order. KEYS: the order, the new owner's owned set. ARGV: owner and epoch
/// read, new doc, new owner, new epoch, state, step, order id. Writes only if the order is still
/// finished (its webhook delivered or not) and unchanged since it was read (compare-and-set), so
/// of two concurrent retries exactly one re-opens it; and the re-opened order joins its owner's
/// set in the same step.
const REOPEN: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'state')
if not cur[1] then return 'missing' end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 'changed' end
if cur[3] ~= 'finished' and cur[3] ~= 'notifying' then return 'changed' end
redis.call('HSET', KEYS[1], 'doc', ARGV[3], 'owner', ARGV[4], 'epoch', ARGV[5], 'state', ARGV[6], 'step', ARGV[7])
redis.call('SADD', KEYS[2], ARGV[8])
return 'ok'
";

/// Put an order in its owner's owned set if unfinished, out of it if finished. KEYS: the order.
/// ARGV: the owned sets' key prefix, the order id. Returns 1, or 0 when the order is missing.
/// Why a script: the index repair must not put back an order that finished (or moved) after
/// the repair read it.
const REPAIR_OWNED: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'state')
if not cur[1] then return 0 end
if cur[2] == 'finished' then
  redis.call('SREM', ARGV[1] .. cur[1], ARGV[2])
else
  redis.call('SADD', ARGV[1] .. cur[1], ARGV[2])
end
return 1
";

/// Take an order out of a node's owned set unless that node owns it unfinished. KEYS: the
/// order, the node's owned set. ARGV: the node, the order id. Returns 1 when it was taken out.
const DISOWN: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'state')
if cur[1] == ARGV[1] and cur[2] ~= 'finished' then return 0 end
return redis.call('SREM', KEYS[2], ARGV[2])
";

pub(super) struct Scripts {
    pub create: Script,
    pub commit: Script,
    pub cancel: Script,
    pub reassign: Script,
    pub reopen: Script,
    pub repair_owned: Script,
    pub disown: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            create: Script::new(CREATE),
            commit: Script::new(COMMIT),
            cancel: Script::new(CANCEL),
            reassign: Script::new(REASSIGN),
            reopen: Script::new(REOPEN),
            repair_owned: Script::new(REPAIR_OWNED),
            disown: Script::new(DISOWN),
        }
    }

    /// The scripts that are sent inside pipelines, loaded again when Redis has forgotten them.
    pub fn pipelined(&self) -> [&Script; 2] {
        [&self.reassign, &self.repair_owned]
    }
}
