//! The Lua scripts of the order store. Each is one atomic step on one order: its hash and the
//! index entries that change with it, so that no failure between two calls can leave an index
//! that disagrees with the order. Every key a script touches is in one shard (hash slot).
//! A constant score is given as text (`'0'`): Redis prints a Lua number with `snprintf` before
//! the command reads it back.

use deadpool_redis::redis::Script;

/// Shared by the scripts that finish an order (prefixed to them): starts its retention. The
/// order hash expires `retention` ms from now, and so does its idempotency key `idem` (sooner if
/// it was to expire sooner anyway) when that key still names this order; the finished index gets
/// an entry, scored with when the order expires (by Redis's clock, read once per script call: an
/// entry due a moment early is scored again by the retention pass), from which the retention
/// pass later takes the order's user index entry out. The idempotency key's name is read from
/// the order hash (by `own_idem`, or with the rest a commit reads) before the script writes
/// anything: it is the one key a script touches that the caller cannot name in KEYS, and it is
/// in the order's shard (its hash slot) by construction, so Redis Cluster runs it; were that
/// slot half moved to another primary, the read fails before any write, and the caller tries
/// again.
const FINISH: &str = r"
local function own_idem(order, id)
  local idem = redis.call('HGET', order, 'idem')
  if idem and redis.call('GET', idem) == id then return idem end
  return false
end
local now_ms = false
local function finish(order, idem, retention, finished, entry)
  redis.call('PEXPIRE', order, retention)
  if idem then redis.call('PEXPIRE', idem, retention, 'LT') end
  if not now_ms then
    local now = redis.call('TIME')
    now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  end
  redis.call('ZADD', finished, now_ms + tonumber(retention), entry)
end
";

/// Shared by the scripts that change an order's step or rollback state, or delete it (prefixed
/// to them): its entry in its user's state index. `file_state` files the order under `index`
/// (the state index of its step or rollback state) and out of the one the order hash names in
/// `filed`, which it then names `index`: like `own_idem`'s key, that one is read from the hash,
/// and is in the order's shard by construction. `unfile` takes a gone order's member out of the
/// state indexes `KEYS[from]` to the last.
const STATE: &str = r"
local function file_state(order, index, member)
  local filed = redis.call('HGET', order, 'filed')
  if filed ~= index then
    if filed then redis.call('ZREM', filed, member) end
    redis.call('HSET', order, 'filed', index)
  end
  redis.call('ZADD', index, '0', member)
end
local function unfile(member, from)
  for i = from, #KEYS do redis.call('ZREM', KEYS[i], member) end
end
";

/// Shared by the scripts that write a split order (prefixed to them; see
/// `StoredForm::Split`): its steps are the fields `s0` to `s5`, and `sv` names the revision of
/// the write that last wrote them. A write of a split order gives, after its own arguments, its
/// base (the revision whose steps it changes, or `f`: it gives every step, and the fields of
/// steps it does not have are deleted), how many steps it gives, and those steps, each as its
/// field and its JSON (in the order of their fields, when it gives every step). With `q` the
/// argument before the base: `split_given` answers where the steps given start and end in ARGV
/// (to `unpack` into the write's `HSET`, which makes no table); `split_same` whether the
/// stored order is the one a write with every step gives, `doc` being its doc; `split_trim`
/// deletes, for such a write, the fields of the steps it does not have.
pub(super) const SPLIT: &str = r"
local SLOTS = {'s0', 's1', 's2', 's3', 's4', 's5'}
-- How many steps a write gives, by its argument: `tonumber` would call `strtod`.
local COUNTS = {['0'] = 0, ['1'] = 1, ['2'] = 2, ['3'] = 3, ['4'] = 4, ['5'] = 5, ['6'] = 6}
local function split_given(q)
  return q + 3, q + 2 + 2 * COUNTS[ARGV[q + 2]]
end
local function split_same(order, doc, q)
  if ARGV[q + 1] ~= 'f' or redis.call('HGET', order, 'doc') ~= doc then return false end
  local first, last = split_given(q)
  local cur = redis.call('HMGET', order, unpack(SLOTS))
  for i = 1, #SLOTS do
    local at = first + 2 * i - 1
    local given = ''
    if at <= last then given = ARGV[at] end
    if (cur[i] or '') ~= given then return false end
  end
  return true
end
local function split_trim(order, q)
  local n = COUNTS[ARGV[q + 2]]
  if ARGV[q + 1] == 'f' and n < #SLOTS then redis.call('HDEL', order, unpack(SLOTS, n + 1)) end
end
";

/// Commit one order's transition (a function of [`WRITES`]). KEYS, three: the order, the
/// committer's owned set, the state index of the new step or rollback state; a write that
/// stores the order finished or notifying (only such a write, `finishing`) names two more: the
/// finished and parked indexes. ARGV, nine: owner, epoch, doc, aware of cancellation (1/0),
/// state, step, order id, revision, user index member; when finishing, three more: retention
/// (ms), finished index entry, parked (1/0). Answers `ok`, `not_owner`, `cancel`, `stale` or
/// `missing`. Why a script: the owner/epoch check and the write must be one atomic step, or a
/// node that just lost the order could overwrite its new owner's progress; a write must be newer
/// than the stored revision, or one delivered late (TCP retransmitting it after a network cut
/// healed) would take the order back, while the very write already stored (a retry after a lost
/// answer) is done; and the order leaves the committer's owned set in the same step when it
/// finishes (never before) or turns out not to be the committer's, and its retention starts in
/// that same step.
const COMMIT: &str = r"
-- The answer to the owner's write of `revision` over the stored fields `cur` (owner, epoch,
-- cancel, rev) when it is not to be written: 'stale', 'cancel', or 'ok' for the very write
-- stored already (an earlier try whose answer was lost, maybe not replicated yet: written
-- again unchanged, so the WAIT after this call covers it); false when it is to be written.
-- Revisions are decimal numbers without leading zeros, compared as text (`tonumber` would
-- call `strtod`): the longer is the larger, and of two as long, the one sorting after. `p`:
-- where a split order's write has its step fields (see `SPLIT`), false for any other.
local function settled(order, cur, doc, aware, revision, p)
  local rev = cur[4] or '0'
  local older = #revision < #rev or (#revision == #rev and revision < rev)
  if older then return 'stale' end
  if revision == rev then
    local same
    if p then same = split_same(order, doc, p) else same = redis.call('HGET', order, 'doc') == doc end
    if not same then return 'stale' end
  end
  if cur[3] == '1' and aware == '0' then return 'cancel' end
  if revision == rev then
    redis.call('HSET', order, 'rev', revision)
    return 'ok'
  end
  return false
end
local function commit(k, a, finishing, split)
  local order, owned, index = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local owner, epoch, doc, aware, state, step, id, revision, member = unpack(ARGV, a + 1, a + 9)
  -- The idempotency key's name and the stored state only matter to a finishing write; the
  -- revision its steps were written at, only to a split order's.
  local cur, p, sv = nil, false, nil
  if finishing and split then
    cur = redis.call('HMGET', order, 'owner', 'epoch', 'cancel', 'rev', 'filed', 'idem', 'state', 'sv')
    p, sv = a + 12, cur[8]
  elseif finishing then
    cur = redis.call('HMGET', order, 'owner', 'epoch', 'cancel', 'rev', 'filed', 'idem', 'state')
  elseif split then
    cur = redis.call('HMGET', order, 'owner', 'epoch', 'cancel', 'rev', 'filed', 'sv')
    p, sv = a + 9, cur[6]
  else
    cur = redis.call('HMGET', order, 'owner', 'epoch', 'cancel', 'rev', 'filed')
  end
  -- own_idem, with the key's name read above, before anything is written.
  local idem = false
  if state == 'finished' and cur[6] and redis.call('GET', cur[6]) == id then idem = cur[6] end
  if not cur[1] then
    redis.call('SREM', owned, id)
    return 'missing'
  end
  if cur[1] ~= owner or cur[2] ~= epoch then
    if cur[1] ~= owner then redis.call('SREM', owned, id) end
    return 'not_owner'
  end
  -- A split order's write that changes only some steps needs them as its base left them.
  if p and ARGV[p + 1] ~= 'f' and ARGV[p + 1] ~= sv then return 'full' end
  local answer = settled(order, cur, doc, aware, revision, p)
  if answer then return answer end
  -- file_state, with the filed key read above and written with the rest; an order filed
  -- under its index already is in it (every write of `filed` adds it), and stays.
  if p then
    local first, last = split_given(p)
    if cur[5] ~= index then
      if cur[5] then redis.call('ZREM', cur[5], member) end
      redis.call('HSET', order, 'doc', doc, 'state', state, 'step', step, 'rev', revision, 'sv', revision, 'filed', index, unpack(ARGV, first, last))
      redis.call('ZADD', index, '0', member)
    else
      redis.call('HSET', order, 'doc', doc, 'state', state, 'step', step, 'rev', revision, 'sv', revision, unpack(ARGV, first, last))
    end
    split_trim(order, p)
  elseif cur[5] ~= index then
    if cur[5] then redis.call('ZREM', cur[5], member) end
    redis.call('HSET', order, 'doc', doc, 'state', state, 'step', step, 'rev', revision, 'filed', index)
    redis.call('ZADD', index, '0', member)
  else
    redis.call('HSET', order, 'doc', doc, 'state', state, 'step', step, 'rev', revision)
  end
  if finishing then
    local finished, parked = KEYS[k + 4], KEYS[k + 5]
    local retention, entry, is_parked = ARGV[a + 10], ARGV[a + 11], ARGV[a + 12]
    -- Only an order stored finished (or notifying) can be in the parked index.
    if is_parked == '1' then
      redis.call('ZADD', parked, '0', id)
    elseif cur[7] ~= 'forward' and cur[7] ~= 'rolling_back' then
      redis.call('ZREM', parked, id)
    end
    if state == 'finished' then
      redis.call('SREM', owned, id)
      finish(order, idem, retention, finished, entry)
    end
  end
  return 'ok'
end
";

/// Commit a move from one work step to the next (a function of [`WRITES`]): most of an order's
/// writes, which change no index. KEYS, two: the order, the state index of the work steps.
/// ARGV, seven: owner, epoch, doc, aware of cancellation (1/0), state, step, revision. Answers
/// as [`COMMIT`] does, except that where a commit would do more than write the order (the order
/// is gone, not the committer's, or filed under another index) it writes nothing and answers
/// `full`: the caller then sends the whole commit, which decides on the order as it is then.
/// So such a write carries no owned set, order id or index member: three strings fewer for Lua
/// to take in, on three of an order's four commits.
const STEP: &str = r"
local function step(k, a, split)
  local order, index = KEYS[k + 1], KEYS[k + 2]
  local owner, epoch, doc, aware, state, step_name, revision = unpack(ARGV, a + 1, a + 7)
  local cur
  if split then
    cur = redis.call('HMGET', order, 'owner', 'epoch', 'cancel', 'rev', 'filed', 'sv')
  else
    cur = redis.call('HMGET', order, 'owner', 'epoch', 'cancel', 'rev', 'filed')
  end
  if cur[1] ~= owner or cur[2] ~= epoch or cur[5] ~= index then return 'full' end
  local p = false
  if split then
    p = a + 7
    if ARGV[p + 1] ~= 'f' and ARGV[p + 1] ~= cur[6] then return 'full' end
  end
  local answer = settled(order, cur, doc, aware, revision, p)
  if answer then return answer end
  if p then
    local first, last = split_given(p)
    redis.call('HSET', order, 'doc', doc, 'state', state, 'step', step_name, 'rev', revision, 'sv', revision, unpack(ARGV, first, last))
    split_trim(order, p)
    return 'ok'
  end
  redis.call('HSET', order, 'doc', doc, 'state', state, 'step', step_name, 'rev', revision)
  return 'ok'
end
";

/// Create an order with its index entries (a function of [`WRITES`]). KEYS, four to six: the
/// order, its owner's owned set, its user's index, (only for an order stored finished,
/// `finishing`) the finished index, (only with one, `keyed`) the idempotency key, whose name the
/// order hash keeps (`idem`), and last its state index. ARGV, nine: doc, payload (kept apart
/// from the doc in its own field, written only here; empty when the doc holds it), owner,
/// epoch, user, state, step, user index member, order id; when keyed, two more: idempotency
/// ttl (s), take over a key that holds no order id (1/0); when finishing, two more: retention
/// (ms), finished index entry. An order stored finished starts its retention at once. Answers
/// 'ok'; {'exists', current owner} when the id is taken; or {'key', id} when the idempotency key
/// names another id: nothing is written then. Why a script: the order and its index entries are
/// written together or not at all, so no dropped retry leaves an index entry with no order; and
/// of two requests that store the same id, exactly one wins.
const CREATE: &str = r"
local function create(k, a, finishing, keyed, split)
  local order, owned, user_index = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local n, finished, idem = k + 3, false, false
  if finishing then n = n + 1; finished = KEYS[n] end
  if keyed then n = n + 1; idem = KEYS[n] end
  local index = KEYS[n + 1]
  local doc, payload, owner, epoch, user, state, step, member, id = unpack(ARGV, a + 1, a + 9)
  local ttl, take, retention, entry
  if keyed then ttl, take, a = ARGV[a + 10], ARGV[a + 11], a + 2 end
  if finishing then retention, entry, a = ARGV[a + 10], ARGV[a + 11], a + 2 end
  if idem then
    local earlier = redis.call('GET', idem)
    if earlier and earlier ~= id and take ~= '1' then
      return {'key', earlier}
    end
  end
  if redis.call('EXISTS', order) == 1 then
    return {'exists', redis.call('HGET', order, 'owner')}
  end
  -- file_state, for an order that is filed nowhere yet. One HSET, with the idempotency key's
  -- name and the payload kept apart when there are.
  if idem then redis.call('SET', idem, id, 'EX', ttl) end
  if split then
    -- Its head, then (see `SPLIT`) the revision its steps are written at and its steps.
    local first, last = split_given(a + 10)
    local head, sv = ARGV[a + 10], ARGV[a + 11]
    if idem then
      redis.call('HSET', order, 'doc', doc, 'owner', owner, 'epoch', epoch, 'user', user, 'state', state, 'step', step, 'filed', index, 'payload', payload, 'head', head, 'sv', sv, 'idem', idem, unpack(ARGV, first, last))
    else
      redis.call('HSET', order, 'doc', doc, 'owner', owner, 'epoch', epoch, 'user', user, 'state', state, 'step', step, 'filed', index, 'payload', payload, 'head', head, 'sv', sv, unpack(ARGV, first, last))
    end
  elseif payload == '' and not idem then
    redis.call('HSET', order, 'doc', doc, 'owner', owner, 'epoch', epoch, 'user', user, 'state', state, 'step', step, 'filed', index)
  elseif payload == '' then
    redis.call('HSET', order, 'doc', doc, 'owner', owner, 'epoch', epoch, 'user', user, 'state', state, 'step', step, 'filed', index, 'idem', idem)
  elseif not idem then
    redis.call('HSET', order, 'doc', doc, 'owner', owner, 'epoch', epoch, 'user', user, 'state', state, 'step', step, 'filed', index, 'payload', payload)
  else
    redis.call('HSET', order, 'doc', doc, 'owner', owner, 'epoch', epoch, 'user', user, 'state', state, 'step', step, 'filed', index, 'idem', idem, 'payload', payload)
  end
  redis.call('ZADD', user_index, '0', member)
  redis.call('ZADD', index, '0', member)
  if finishing then
    finish(order, idem, retention, finished, entry)
  else
    redis.call('SADD', owned, id)
  end
  return 'ok'
end
";

/// Creates and commits, one or several (a group commit). Per write, ARGV gives its shape, which
/// says what it is and so how many KEYS and arguments it takes (see
/// [`Shape`](super::commits::Shape)), then its arguments; its KEYS follow the previous write's.
/// Answers one answer per write, in order, as [`COMMIT`] and [`CREATE`] name them: each write is
/// checked and made on its own, so one refused write refuses no other. When every answer is a
/// word (as nearly always: only a create that finds its id or key taken answers a list), the
/// answer is the words in one string, separated by spaces: one string is cheaper to send and to
/// read than a list of them.
pub(super) const WRITES: &str = r"
local answers = {}
local words = true
local k, a = 0, 0
-- Each shape: what it is, finishing, keyed, key count, argument count; for a split order's
-- (its name ends in `x`), how many arguments it has before the steps it gives (see `SPLIT`:
-- its base and how many steps it gives, and a create's head), its steps' two each more.
local shapes = {
  c = {'commit', false, false, 3, 9}, cf = {'commit', true, false, 5, 12},
  s = {'step', false, false, 2, 7},
  n = {'create', false, false, 4, 9}, nf = {'create', true, false, 5, 11},
  ni = {'create', false, true, 5, 11}, nfi = {'create', true, true, 6, 13},
  cx = {'commit', false, false, 3, 9, 2}, cfx = {'commit', true, false, 5, 12, 2},
  sx = {'step', false, false, 2, 7, 2},
  nx = {'create', false, false, 4, 9, 3}, nfx = {'create', true, false, 5, 11, 3},
  nix = {'create', false, true, 5, 11, 3}, nfix = {'create', true, true, 6, 13, 3},
}
while a < #ARGV do
  local shape = shapes[ARGV[a + 1]]
  if not shape then return redis.error_reply('unknown write shape ' .. tostring(ARGV[a + 1])) end
  local args = shape[5]
  if shape[6] then
    local given = COUNTS[ARGV[a + 1 + args + shape[6]]]
    if not given then return redis.error_reply('a split write without its step count') end
    args = args + shape[6] + 2 * given
  end
  if shape[1] == 'create' then
    local answer = create(k, a + 1, shape[2], shape[3], shape[6] ~= nil)
    if type(answer) ~= 'string' then words = false end
    answers[#answers + 1] = answer
  elseif shape[1] == 'step' then
    answers[#answers + 1] = step(k, a + 1, shape[6] ~= nil)
  else
    answers[#answers + 1] = commit(k, a + 1, shape[2], shape[6] ~= nil)
  end
  k, a = k + shape[4], a + 1 + args
end
if words then return table.concat(answers, ' ') end
return answers
";

/// Record a cancellation. KEYS[1] = order. ARGV: user. Returns nil for another user's or an
/// unknown order, else {doc, owner, epoch, cancel before, payload (only where it is kept
/// apart), and where the order is split, its head and steps}. Atomic so a cancellation is
/// recorded only on an order still running forward.
const CANCEL: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'user', 'state', 'cancel', 'doc', 'owner', 'epoch', 'payload', 'head', 's0', 's1', 's2', 's3', 's4', 's5')
if not cur[1] or cur[1] ~= ARGV[1] then return false end
if cur[2] == 'forward' and cur[3] ~= '1' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
end
return {cur[4], cur[5], cur[6], cur[3] or '0', cur[7], cur[8], cur[9], cur[10], cur[11], cur[12], cur[13], cur[14]}
";

/// Move one order and its owned-set entry. KEYS: the order, `from`'s owned set, `to`'s owned
/// set. ARGV: from, to, order id. Returns 'moved', 'mine' (already `to`'s), 'finished',
/// 'missing', or the current owner (whose owned set the caller then makes sure lists it, with
/// `enlist`: that set is not among these KEYS); the order ends in no owned set of the two but
/// its owner's. Why a script: the owner check and the epoch bump must not interleave with a
/// commit by the old owner, and the order must never belong to `to` while listed only under
/// `from` (a taker that fails then would never see it).
const REASSIGN: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'state')
redis.call('SREM', KEYS[2], ARGV[3])
if not cur[1] then return 'missing' end
if cur[2] == 'finished' then return 'finished' end
if cur[1] == ARGV[2] then
  redis.call('SADD', KEYS[3], ARGV[3])
  return 'mine'
end
if cur[1] ~= ARGV[1] then return cur[1] end
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
return 'moved'
";

/// Put an order in its owner's owned set if that owner still owns it unfinished. KEYS: the
/// order, the owner's owned set. ARGV: the owner, the order id. Returns 1 when it is listed.
const ENLIST: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'state')
if cur[1] ~= ARGV[1] or cur[2] == 'finished' then return 0 end
redis.call('SADD', KEYS[2], ARGV[2])
return 1
";

/// Re-open a finished order (a parked rollback, or a failed webhook). KEYS: the order, the new
/// owner's owned set, the parked index, the state index it goes to. ARGV: owner and epoch read,
/// new doc, new owner, new epoch, state, step, order id, user index member, revision read, new
/// revision, parked (1/0: a failed webhook re-opened stays as parked as it was); for a split
/// order, `f`, how many steps it has and its steps (see `SPLIT`), which its next write then gives
/// whole too. Writes only if the order is still finished (its webhook delivered or not) and
/// unchanged since it was read (compare-and-set on owner, epoch and revision), so of two
/// concurrent requests exactly one re-opens it, and a commit of the finished order landing in
/// between (its webhook's outcome) sends it back to read again; and the re-opened order joins its
/// owner's set, is in the parked index or not as it says, and is kept again (its retention
/// stopped), in the same step. Its finished index entry stays: the retention pass finds the order
/// there and only drops the entry.
const REOPEN: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'state', 'rev')
if not cur[1] then return 'missing' end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 'changed' end
-- A record without a revision field (never written by a commit here) is judged by owner and
-- epoch alone.
if cur[4] and cur[4] ~= ARGV[10] then return 'changed' end
if cur[3] ~= 'finished' and cur[3] ~= 'notifying' then return 'changed' end
redis.call('HSET', KEYS[1], 'doc', ARGV[3], 'owner', ARGV[4], 'epoch', ARGV[5], 'state', ARGV[6], 'step', ARGV[7], 'rev', ARGV[11])
if #ARGV > 12 then
  -- A split order: all its steps, given whole; its next write gives all of them too.
  local first, last = split_given(12)
  if last >= first then redis.call('HSET', KEYS[1], unpack(ARGV, first, last)) end
  split_trim(KEYS[1], 12)
  redis.call('HDEL', KEYS[1], 'sv')
end
file_state(KEYS[1], KEYS[4], ARGV[9])
redis.call('PERSIST', KEYS[1])
redis.call('SADD', KEYS[2], ARGV[8])
if ARGV[12] == '1' then
  redis.call('ZADD', KEYS[3], '0', ARGV[8])
else
  redis.call('ZREM', KEYS[3], ARGV[8])
end
return 'ok'
";

/// Put an order in its owner's owned set if unfinished (unless it is set aside: taking it back
/// is the set-aside look's, at a new epoch), out of it if finished, and in its user's index; a
/// finished order with no expiry (stored before retention, or by an older version) starts its
/// retention, an unfinished one with an expiry loses it; a finished one parked as read is in the
/// parked index, an unfinished one is not. KEYS: the order, the finished index, the user's
/// index, the parked index, the owned set of its owner as read, the state index of the order as
/// read, the aside index. ARGV: the owner as read, the order id, retention (ms), finished index
/// entry, user index member, parked as read (1/0), and its doc as read: it is filed in that state
/// index only if its doc is still that one (every change of its state writes a new doc, and
/// files it itself). Returns 1; 0 when the order is missing; 2 when its owner changed since it
/// was read (the next repair pass sees it again). Why a script: the index repair must not put
/// back an order that finished (or moved, or expired) after the repair read it.
const REPAIR_OWNED: &str = r"
local idem = own_idem(KEYS[1], ARGV[2])
local cur = redis.call('HMGET', KEYS[1], 'owner', 'state')
if not cur[1] then return 0 end
if cur[1] ~= ARGV[1] then return 2 end
redis.call('ZADD', KEYS[3], '0', ARGV[5])
if redis.call('HGET', KEYS[1], 'doc') == ARGV[7] then file_state(KEYS[1], KEYS[6], ARGV[5]) end
if cur[2] == 'finished' then
  redis.call('SREM', KEYS[5], ARGV[2])
  if redis.call('PTTL', KEYS[1]) == -1 then finish(KEYS[1], idem, ARGV[3], KEYS[2], ARGV[4]) end
  if ARGV[6] == '1' then redis.call('ZADD', KEYS[4], '0', ARGV[2]) end
else
  redis.call('ZREM', KEYS[4], ARGV[2])
  if redis.call('HEXISTS', KEYS[7], ARGV[2]) == 0 then redis.call('SADD', KEYS[5], ARGV[2]) end
  redis.call('PERSIST', KEYS[1])
end
return 1
";

/// The retention pass, for one entry of a shard's finished index that the caller found due:
/// when it is still due by Redis's clock, it goes with the order's user index entry if the
/// order is gone; if the order is kept again (re-opened) it just goes; if the order is still
/// there to expire (its expiry a moment later than the entry's score, by the clock's
/// granularity) it is scored again with it; an order gone leaves the parked index and the
/// user's state indexes of finished orders too. KEYS: the finished index, the parked index, the
/// order, the user's index, then those state indexes. ARGV: the entry
/// (`{order id} {user index member} {user}`), the user index member, the order id. Returns 1
/// when it went through the entry, 0 when it is not (or no longer) due. Why a script: the look
/// at the order and the removal of its entry must not interleave with a re-open.
const PRUNE_FINISHED: &str = r"
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if tonumber(score) > now_ms then return 0 end
local ttl = redis.call('PTTL', KEYS[3])
if ttl >= 0 then
  redis.call('ZADD', KEYS[1], now_ms + ttl + 1, ARGV[1])
  return 1
end
if ttl == -2 then
  redis.call('ZREM', KEYS[4], ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[3])
  unfile(ARGV[2], 5)
end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
";

/// Take a user index entry out if its order is gone (its retention ran out), and out of the
/// user's state indexes. KEYS: the order, the user's index, then those state indexes. ARGV:
/// the member. Returns 1 when it was taken out. Why a script: an order
/// stored between the listing's read and this removal keeps its entry.
const PRUNE_MEMBER: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
unfile(ARGV[1], 3)
return redis.call('ZREM', KEYS[2], ARGV[1])
";

/// Take an order out of a node's owned set unless that node owns it unfinished. KEYS: the
/// order, the node's owned set. ARGV: the node, the order id. Returns 1 when it was taken out.
const DISOWN: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'state')
if cur[1] == ARGV[1] and cur[2] ~= 'finished' then return 0 end
return redis.call('SREM', KEYS[2], ARGV[2])
";

/// Set an order aside. KEYS: its owner's owned set, the aside index. ARGV: the order id, why
/// (JSON). Why a script: it leaves the owned set and joins the aside index in one step.
const SET_ASIDE: &str = r"
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
";

/// Take an order back from the set-aside orders. KEYS: the aside index, the order, the taker's
/// owned set. ARGV: the order id, the taker. Returns 'not_aside' when it is not set aside,
/// 'dropped' when it is finished or gone (its entry goes), else 'taken': it is the taker's,
/// at a new epoch, in the taker's owned set. Why a script: of two nodes taking it back one
/// does, and an order is never out of the aside index without being in an owned set.
const TAKE_BACK: &str = r"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 'not_aside' end
if redis.call('EXISTS', KEYS[2]) == 0 then return 'dropped' end
if redis.call('HGET', KEYS[2], 'state') == 'finished' then return 'dropped' end
redis.call('HINCRBY', KEYS[2], 'epoch', 1)
redis.call('HSET', KEYS[2], 'owner', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
return 'taken'
";

/// Confirm that an order read is replicated. KEYS: the order. ARGV: its revision as read.
/// Returns 1 after writing its revision again (unchanged), so the `WAIT` that follows covers
/// every earlier write of the order, or 0 when the order is gone or at another revision. Why:
/// a node may read an order written on the primary but not yet on any replica (a create or a
/// commit whose `WAIT` failed); acting on it before it is replicated could act on something
/// a failover then loses.
const CONFIRM: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if (redis.call('HGET', KEYS[1], 'rev') or '0') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'rev', ARGV[1])
return 1
";

pub(super) struct Scripts {
    pub writes: Script,
    pub cancel: Script,
    pub reassign: Script,
    pub enlist: Script,
    pub set_aside: Script,
    pub take_back: Script,
    pub reopen: Script,
    pub repair_owned: Script,
    pub disown: Script,
    pub prune_finished: Script,
    pub prune_member: Script,
    pub confirm: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            writes: Script::new(&format!("{FINISH}{SPLIT}{COMMIT}{STEP}{CREATE}{WRITES}")),
            cancel: Script::new(CANCEL),
            reassign: Script::new(REASSIGN),
            enlist: Script::new(ENLIST),
            set_aside: Script::new(SET_ASIDE),
            take_back: Script::new(TAKE_BACK),
            reopen: Script::new(&format!("{STATE}{SPLIT}{REOPEN}")),
            repair_owned: Script::new(&format!("{FINISH}{STATE}{REPAIR_OWNED}")),
            disown: Script::new(DISOWN),
            prune_finished: Script::new(&format!("{STATE}{PRUNE_FINISHED}")),
            prune_member: Script::new(&format!("{STATE}{PRUNE_MEMBER}")),
            confirm: Script::new(CONFIRM),
        }
    }

    /// The scripts that are sent inside pipelines, loaded again when Redis has forgotten them.
    pub fn pipelined(&self) -> [&Script; 5] {
        [
            &self.reassign,
            &self.enlist,
            &self.repair_owned,
            &self.prune_member,
            &self.prune_finished,
        ]
    }
}
