//! The Lua scripts of the order store. Each is one atomic step on one order's key.

use deadpool_redis::redis::Script;

/// Commit a transition. KEYS[1] = order. ARGV: owner, epoch, doc, aware of cancellation (1/0),
/// state, step. Why a script: the owner/epoch check and the write must be one atomic step, or a
/// node that just lost the order could overwrite its new owner's progress.
const COMMIT: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'cancel')
if not cur[1] then return 'missing' end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 'not_owner' end
if cur[3] == '1' and ARGV[4] == '0' then return 'cancel' end
redis.call('HSET', KEYS[1], 'doc', ARGV[3], 'state', ARGV[5], 'step', ARGV[6])
return 'ok'
";

/// Create an order. KEYS[1] = order. ARGV: doc, owner, epoch, user, state, step. Returns {'ok'},
/// or {'exists', current owner} and writes nothing. Atomic so that two requests with the same
/// idempotency key (one stalled, one retried elsewhere) cannot both store the order.
const CREATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'exists', redis.call('HGET', KEYS[1], 'owner')}
end
redis.call('HSET', KEYS[1], 'doc', ARGV[1], 'owner', ARGV[2], 'epoch', ARGV[3], 'user', ARGV[4], 'state', ARGV[5], 'step', ARGV[6])
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

/// Move one order. KEYS[1] = order. ARGV: from, to. Returns 'moved', 'mine' (already `to`'s),
/// 'finished', 'missing', or the current owner. Atomic: the owner check and the epoch bump
/// must not interleave with a commit by the old owner.
const REASSIGN: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'state')
if not cur[1] then return 'missing' end
if cur[2] == 'finished' then return 'finished' end
if cur[1] == ARGV[2] then return 'mine' end
if cur[1] ~= ARGV[1] then return cur[1] end
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[2])
return 'moved'
";

/// Re-open a parked order. KEYS[1] = order. ARGV: owner and epoch read, new doc, new owner, new
/// epoch, state, step. Writes only if the order is still finished and unchanged since it was
/// read (compare-and-set), so of two concurrent retries exactly one re-opens it.
const REOPEN: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'state')
if not cur[1] then return 'missing' end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] or cur[3] ~= 'finished' then return 'changed' end
redis.call('HSET', KEYS[1], 'doc', ARGV[3], 'owner', ARGV[4], 'epoch', ARGV[5], 'state', ARGV[6], 'step', ARGV[7])
return 'ok'
";

pub(super) struct Scripts {
    pub create: Script,
    pub commit: Script,
    pub cancel: Script,
    pub reassign: Script,
    pub reopen: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            create: Script::new(CREATE),
            commit: Script::new(COMMIT),
            cancel: Script::new(CANCEL),
            reassign: Script::new(REASSIGN),
            reopen: Script::new(REOPEN),
        }
    }

    /// The scripts that are sent inside pipelines, loaded again when Redis has forgotten them.
    pub fn pipelined(&self) -> [&Script; 3] {
        [&self.create, &self.commit, &self.reassign]
    }
}
