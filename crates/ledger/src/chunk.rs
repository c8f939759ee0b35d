//! What parsing a received change would cost, read from its header before Automerge parses it.
//!
//! Automerge stores a change's ops in run-length-encoded columns: a run of a billion identical
//! ops is a few bytes on the wire, and Automerge walks (and, for `pred` lists, collects) every
//! one of them while parsing. So before a change is handed to Automerge, the receive path reads
//! just the chunk header and two columns — the action column, whose length is the op count, and
//! the `pred` group column, whose values are the pred-list lengths — and refuses a change whose
//! counts exceed the limits. Loops run over bytes, never over counts, and every sum is checked.

/// The first bytes of every Automerge chunk.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// Chunk type of an uncompressed change.
const CHANGE_CHUNK: u8 = 1;
/// Column spec (id << 4 | type) of the action column: id 4, integer RLE.
const ACTION_COLUMN: u32 = (4 << 4) | 2;
/// Column spec of the `pred` group column (the pred count of each op): id 7, group.
const PRED_GROUP_COLUMN: u32 = 7 << 4;
/// Bit of a column spec that marks a deflated column.
const DEFLATE_BIT: u32 = 1 << 3;

/// Why the header says no.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// Not a change chunk as this replica writes them.
    #[error("not an uncompressed change chunk")]
    NotAChange,
    /// The header or a column runs past the end or holds a bad number.
    #[error("truncated or malformed change header")]
    Truncated,
    /// More ops, or more preds, than the limit.
    #[error("{what} over the limit of {limit}")]
    OverLimit {
        /// `ops` or `preds`.
        what: &'static str,
        limit: u64,
    },
}

struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], ChunkError> {
        let n = usize::try_from(n).map_err(|_| ChunkError::Truncated)?;
        if n > self.b.len() {
            return Err(ChunkError::Truncated);
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn uleb(&mut self) -> Result<u64, ChunkError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let [byte, rest @ ..] = self.b else {
                return Err(ChunkError::Truncated);
            };
            self.b = rest;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(ChunkError::Truncated);
            }
            v |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ChunkError::Truncated)
    }

    fn sleb(&mut self) -> Result<i64, ChunkError> {
        let mut v: i64 = 0;
        let mut shift = 0u32;
        loop {
            let [byte, rest @ ..] = self.b else {
                return Err(ChunkError::Truncated);
            };
            self.b = rest;
            if shift >= 64 {
                return Err(ChunkError::Truncated);
            }
            v |= i64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                if shift < 64 && byte & 0x40 != 0 {
                    v |= -1i64 << shift;
                }
                return Ok(v);
            }
        }
    }

    fn skip_prefixed(&mut self) -> Result<(), ChunkError> {
        let n = self.uleb()?;
        self.take(n).map(|_| ())
    }
}

/// Check that `bytes` is an uncompressed change chunk whose op count is at most `max_ops` and
/// whose ops name at most `max_preds` preds in all, without walking any run.
pub fn check_change_header(bytes: &[u8], max_ops: u64, max_preds: u64) -> Result<(), ChunkError> {
    let mut c = Cursor { b: bytes };
    if c.take(4)? != MAGIC {
        return Err(ChunkError::NotAChange);
    }
    c.take(4)?; // checksum
    if c.take(1)? != [CHANGE_CHUNK] {
        return Err(ChunkError::NotAChange);
    }
    let len = c.uleb()?;
    let mut c = Cursor { b: c.take(len)? };
    let deps = c.uleb()?;
    c.take(deps.checked_mul(32).ok_or(ChunkError::Truncated)?)?;
    c.skip_prefixed()?; // actor
    c.uleb()?; // seq
    c.uleb()?; // start op
    c.sleb()?; // time
    c.skip_prefixed()?; // message
    let others = c.uleb()?;
    for _ in 0..others.min(c.b.len() as u64 + 1) {
        c.skip_prefixed()?;
    }
    let columns = c.uleb()?;
    let mut specs: Vec<(u32, u64)> = Vec::new();
    for _ in 0..columns.min(c.b.len() as u64 + 1) {
        let spec = u32::try_from(c.uleb()?).map_err(|_| ChunkError::Truncated)?;
        let len = c.uleb()?;
        specs.push((spec, len));
    }
    for (spec, len) in specs {
        let data = c.take(len)?;
        match spec & !DEFLATE_BIT {
            ACTION_COLUMN => rle_len(data, max_ops, "ops")?,
            PRED_GROUP_COLUMN => rle_sum(data, max_preds, "preds")?,
            _ => 0,
        };
    }
    Ok(())
}

/// How many values an RLE column holds, refusing more than `limit`.
fn rle_len(data: &[u8], limit: u64, what: &'static str) -> Result<u64, ChunkError> {
    let mut c = Cursor { b: data };
    let mut n: u64 = 0;
    while !c.b.is_empty() {
        let count = c.sleb()?;
        let run = if count > 0 {
            c.uleb()?;
            count.unsigned_abs()
        } else if count < 0 {
            let k = count.unsigned_abs();
            for _ in 0..k.min(c.b.len() as u64 + 1) {
                c.uleb()?;
            }
            k
        } else {
            c.uleb()?
        };
        n = n
            .checked_add(run)
            .filter(|n| *n <= limit)
            .ok_or(ChunkError::OverLimit { what, limit })?;
    }
    Ok(n)
}

/// The sum of the values of an RLE column of unsigned integers, refusing more than `limit`.
fn rle_sum(data: &[u8], limit: u64, what: &'static str) -> Result<u64, ChunkError> {
    let over = ChunkError::OverLimit { what, limit };
    let mut c = Cursor { b: data };
    let mut sum: u64 = 0;
    while !c.b.is_empty() {
        let count = c.sleb()?;
        let add = if count > 0 {
            let v = c.uleb()?;
            v.checked_mul(count.unsigned_abs()).ok_or(over.clone())?
        } else if count < 0 {
            let mut s: u64 = 0;
            for _ in 0..count.unsigned_abs().min(c.b.len() as u64 + 1) {
                s = s.checked_add(c.uleb()?).ok_or(over.clone())?;
            }
            s
        } else {
            c.uleb()?;
            0
        };
        sum = sum
            .checked_add(add)
            .filter(|s| *s <= limit)
            .ok_or(over.clone())?;
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uleb(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn sleb(mut v: i64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            let done = (v == 0 && b & 0x40 == 0) || (v == -1 && b & 0x40 != 0);
            out.push(if done { b } else { b | 0x80 });
            if done {
                return;
            }
        }
    }

    /// A change chunk by hand: no deps, a 32-byte actor, seq 1, op 1, time 0, no message, no
    /// other actors, and the given columns.
    fn chunk(columns: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut body = Vec::new();
        uleb(0, &mut body);
        uleb(32, &mut body);
        body.extend([7u8; 32]);
        uleb(1, &mut body);
        uleb(1, &mut body);
        sleb(0, &mut body);
        uleb(0, &mut body);
        uleb(0, &mut body);
        uleb(columns.len() as u64, &mut body);
        for (spec, data) in columns {
            uleb(u64::from(*spec), &mut body);
            uleb(data.len() as u64, &mut body);
        }
        for (_, data) in columns {
            body.extend(data);
        }
        let mut out = MAGIC.to_vec();
        out.extend([0; 4]);
        out.push(CHANGE_CHUNK);
        uleb(body.len() as u64, &mut out);
        out.extend(body);
        out
    }

    fn run(count: i64, value: u64) -> Vec<u8> {
        let mut v = Vec::new();
        sleb(count, &mut v);
        uleb(value, &mut v);
        v
    }

    #[test]
    fn a_run_of_a_trillion_ops_in_a_few_bytes_is_refused_unwalked() {
        let bomb = chunk(&[(ACTION_COLUMN, run(1 << 40, 4))]);
        assert!(bomb.len() < 64);
        assert_eq!(
            check_change_header(&bomb, 4_096, 4_096),
            Err(ChunkError::OverLimit {
                what: "ops",
                limit: 4_096
            })
        );
        let ok = chunk(&[(ACTION_COLUMN, run(3, 4))]);
        assert_eq!(check_change_header(&ok, 4_096, 4_096), Ok(()));
    }

    #[test]
    fn a_pred_list_of_a_billion_is_refused() {
        let bomb = chunk(&[
            (ACTION_COLUMN, run(1, 4)),
            (PRED_GROUP_COLUMN, run(1, 1 << 30)),
        ]);
        assert!(matches!(
            check_change_header(&bomb, 4_096, 4_096),
            Err(ChunkError::OverLimit { what: "preds", .. })
        ));
        let overflow = chunk(&[(PRED_GROUP_COLUMN, run(i64::MAX, u64::MAX))]);
        assert!(check_change_header(&overflow, 4_096, 4_096).is_err());
    }

    #[test]
    fn truncated_and_foreign_bytes_are_refused() {
        let ok = chunk(&[(ACTION_COLUMN, run(3, 4))]);
        for n in 0..ok.len() {
            assert!(check_change_header(&ok[..n], 4_096, 4_096).is_err(), "{n}");
        }
        let mut doc = ok.clone();
        doc[8] = 0;
        assert_eq!(
            check_change_header(&doc, 4_096, 4_096),
            Err(ChunkError::NotAChange)
        );
        let mut deflated = ok;
        deflated[8] = 2;
        assert_eq!(
            check_change_header(&deflated, 4_096, 4_096),
            Err(ChunkError::NotAChange)
        );
        // Literal and null runs count too; i64::MIN as a count does not overflow.
        let mut lit = Vec::new();
        sleb(-3, &mut lit);
        for v in [1, 2, 3] {
            uleb(v, &mut lit);
        }
        sleb(0, &mut lit);
        uleb(5_000, &mut lit);
        assert!(check_change_header(&chunk(&[(ACTION_COLUMN, lit)]), 4_096, 4_096).is_err());
        let min = chunk(&[(ACTION_COLUMN, run(i64::MIN, 1))]);
        assert!(check_change_header(&min, 4_096, 4_096).is_err());
    }
}
