//! One keyed diff for the tables whose entries stand alone (no ids, no
//! order between them): the node table and this node's endpoints. The rules
//! are the load-balancing reconciler's: `written` records only writes that
//! succeeded, so a failed one leaves no phantom entry and the next pass
//! plans it again.

use std::collections::BTreeMap;

/// Where a keyed table is written: a kernel map, or a fake in tests.
pub trait KeyedWriter<K, V> {
    type Error: std::error::Error + Send + Sync + 'static;
    fn set(&mut self, key: &K, value: &V) -> Result<(), Self::Error>;
    /// Removing an absent key is not an error.
    fn remove(&mut self, key: &K) -> Result<(), Self::Error>;
}

/// One write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op<K, V> {
    Set(K, V),
    Remove(K),
}

/// The writes that turn `written` into `desired`: removals first (they
/// free room in a full map), then new and changed entries.
pub fn plan<K: Ord + Clone, V: PartialEq + Clone>(
    desired: &BTreeMap<K, V>,
    written: &BTreeMap<K, V>,
) -> Vec<Op<K, V>> {
    let removes = written
        .keys()
        .filter(|k| !desired.contains_key(k))
        .map(|k| Op::Remove(k.clone()));
    let sets = desired
        .iter()
        .filter(|(k, v)| written.get(k) != Some(v))
        .map(|(k, v)| Op::Set(k.clone(), v.clone()));
    removes.chain(sets).collect()
}

/// Writes every op (entries are independent, so one failure does not stop
/// the others), recording each success in `written`. Returns the errors.
pub fn apply<K: Ord + Clone, V: Clone, W: KeyedWriter<K, V>>(
    ops: &[Op<K, V>],
    w: &mut W,
    written: &mut BTreeMap<K, V>,
) -> Vec<W::Error> {
    let mut errors = Vec::new();
    for op in ops {
        let r = match op {
            Op::Set(k, v) => w.set(k, v).map(|()| {
                written.insert(k.clone(), v.clone());
            }),
            Op::Remove(k) => w.remove(k).map(|()| {
                written.remove(k);
            }),
        };
        if let Err(e) = r {
            errors.push(e);
        }
    }
    errors
}

/// A keyed table in memory, failing writes to one key on demand.
#[derive(Debug, Default)]
pub struct FakeTable<K, V> {
    pub entries: BTreeMap<K, V>,
    pub fail_key: Option<K>,
    pub writes: usize,
}

impl<K: Ord + Clone + std::fmt::Debug, V: Clone> KeyedWriter<K, V> for FakeTable<K, V> {
    type Error = super::Injected;
    fn set(&mut self, key: &K, value: &V) -> Result<(), Self::Error> {
        if self.fail_key.as_ref() == Some(key) {
            return Err(super::Injected(format!("set {key:?}")));
        }
        self.writes += 1;
        self.entries.insert(key.clone(), value.clone());
        Ok(())
    }
    fn remove(&mut self, key: &K) -> Result<(), Self::Error> {
        if self.fail_key.as_ref() == Some(key) {
            return Err(super::Injected(format!("remove {key:?}")));
        }
        self.writes += 1;
        self.entries.remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(u32, &'static str)]) -> BTreeMap<u32, &'static str> {
        kv.iter().copied().collect()
    }

    #[test]
    fn minimal_writes_and_nothing_when_in_step() {
        let mut fake = FakeTable::default();
        let mut written = BTreeMap::new();
        let want = map(&[(1, "a"), (2, "b")]);
        let ops = plan(&want, &written);
        assert_eq!(ops.len(), 2);
        assert!(apply(&ops, &mut fake, &mut written).is_empty());
        assert_eq!(fake.entries, want);
        assert!(plan(&want, &written).is_empty(), "in step: no writes");
        let want = map(&[(2, "B"), (3, "c")]);
        let ops = plan(&want, &written);
        assert_eq!(
            ops,
            vec![Op::Remove(1), Op::Set(2, "B"), Op::Set(3, "c")],
            "removals first, then changes"
        );
        assert!(apply(&ops, &mut fake, &mut written).is_empty());
        assert_eq!(
            (fake.entries.clone(), written.clone()),
            (want.clone(), want)
        );
    }

    #[test]
    fn a_failed_write_leaves_no_phantom_and_is_retried() {
        let mut fake = FakeTable {
            fail_key: Some(2),
            ..FakeTable::default()
        };
        let mut written = BTreeMap::new();
        let want = map(&[(1, "a"), (2, "b"), (3, "c")]);
        let errors = apply(&plan(&want, &written), &mut fake, &mut written);
        assert_eq!(errors.len(), 1, "only key 2 failed; the others went on");
        assert_eq!(written, fake.entries, "written holds only successes");
        assert_eq!(plan(&want, &written), vec![Op::Set(2, "b")]);
        fake.fail_key = None;
        assert!(apply(&plan(&want, &written), &mut fake, &mut written).is_empty());
        assert_eq!(fake.entries, want);
    }
}
