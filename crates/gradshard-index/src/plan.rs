use std::collections::{BTreeMap, HashMap};

use gradshard_core::{SampleId, TaskName};
use gradshard_format::{LogRecord, TableEntry, TableView};

use crate::{Error, FrameOrder, Result};

/// Every committed sample of a store, by task; within a task ordered by sample id
/// (integers before strings), so that the order does not depend on commit order.
#[derive(Debug, Clone, Default)]
pub struct Index {
    tasks: BTreeMap<TaskName, Vec<LogRecord>>,
    lookup: HashMap<(TaskName, SampleId), usize>,
}

impl Index {
    /// Builds the index from commit-log records; a (task, sample) committed twice is an error.
    pub fn from_records(records: impl IntoIterator<Item = LogRecord>) -> Result<Index> {
        let mut tasks: BTreeMap<TaskName, Vec<LogRecord>> = BTreeMap::new();
        let mut seen: HashMap<(TaskName, SampleId), u64> = HashMap::new();
        for r in records {
            if let Some(first) = seen.insert((r.task.clone(), r.id.clone()), r.seq) {
                return Err(Error::DuplicateSample {
                    task: r.task,
                    id: r.id,
                    first,
                    second: r.seq,
                });
            }
            tasks.entry(r.task.clone()).or_default().push(r);
        }
        let mut lookup = HashMap::with_capacity(seen.len());
        for (t, v) in tasks.iter_mut() {
            v.sort_by(|a, b| a.id.cmp(&b.id));
            for (i, r) in v.iter().enumerate() {
                lookup.insert((t.clone(), r.id.clone()), i);
            }
        }
        Ok(Index { tasks, lookup })
    }

    pub fn tasks(&self) -> impl Iterator<Item = &TaskName> {
        self.tasks.keys()
    }

    pub fn n_samples(&self) -> usize {
        self.lookup.len()
    }

    /// Samples of `task` in id order; an unknown task is an error listing the known ones.
    pub fn samples(&self, task: &str) -> Result<&[LogRecord]> {
        self.tasks
            .iter()
            .find(|(t, _)| t.as_str() == task)
            .map(|(_, v)| v.as_slice())
            .ok_or_else(|| Error::UnknownTask {
                task: task.to_string(),
                known: self
                    .tasks
                    .keys()
                    .map(|t| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Position of (task, id) within [`samples`](Self::samples).
    pub fn position(&self, task: &TaskName, id: &SampleId) -> Option<usize> {
        self.lookup.get(&(task.clone(), id.clone())).copied()
    }

    pub fn contains(&self, task: &TaskName, id: &SampleId) -> bool {
        self.lookup.contains_key(&(task.clone(), id.clone()))
    }

    /// All records, task by task.
    pub fn records(&self) -> impl Iterator<Item = &LogRecord> {
        self.tasks.values().flatten()
    }
}

/// One frame to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedRead {
    /// Position of the result in the caller's output (e.g. the row of a tile).
    pub slot: usize,
    /// Frame number within the sample (manifest order).
    pub frame: usize,
    pub shard: u32,
    /// The full frame, or for a factored sample the per-frame factor P.
    pub entry: TableEntry,
    /// For a factored sample: the shared factor S (its index in the manifest's
    /// shared-factor order, and its table entry). The slice is Pᵀ S.
    pub shared: Option<(usize, TableEntry)>,
}

/// Frames a query needs, sorted by (shard, offset) so reads sweep each file forward.
#[derive(Debug, Clone, Default)]
pub struct ReadPlan {
    pub reads: Vec<PlannedRead>,
}

impl ReadPlan {
    /// Plans reading `frames` of each of `samples` (records of one task). Slot `i * frames.len() + j`
    /// is sample `i`, frame `frames[j]`. `table` returns the table bytes of a record (from a mapped shard).
    pub fn for_frames<'a>(
        order: &FrameOrder,
        samples: &[&LogRecord],
        frames: &[usize],
        mut table: impl FnMut(&LogRecord) -> Result<&'a [u8]>,
    ) -> Result<ReadPlan> {
        let n = order.n_frames();
        for f in frames {
            if *f >= n {
                return Err(Error::NoSuchFrame {
                    what: "frame",
                    detail: format!("{f} ≥ {n} frames per sample"),
                });
            }
        }
        let mut reads = Vec::with_capacity(samples.len() * frames.len());
        for (i, r) in samples.iter().enumerate() {
            let bytes = table(r)?;
            let view = TableView::parse_unverified(bytes).map_err(|source| Error::Table {
                task: r.task.clone(),
                id: r.id.clone(),
                source,
            })?;
            if view.n_frames as usize != n {
                return Err(Error::FrameCount {
                    task: r.task.clone(),
                    id: r.id.clone(),
                    found: view.n_frames,
                    expected: n,
                });
            }
            if view.is_factored() && view.n_shared as usize != order.n_shared() {
                return Err(Error::SharedCount {
                    task: r.task.clone(),
                    id: r.id.clone(),
                    found: view.n_shared,
                    expected: order.n_shared(),
                });
            }
            for (j, f) in frames.iter().enumerate() {
                let shared = if view.is_factored() {
                    let (sj, _, _) = order.factor_of(*f).ok_or_else(|| Error::NoSuchFrame {
                        what: "shared factor",
                        detail: format!("frame {f} ({}) has none", order.describe(*f)),
                    })?;
                    Some((sj, view.shared_entry(sj)))
                } else {
                    None
                };
                reads.push(PlannedRead {
                    slot: i * frames.len() + j,
                    frame: *f,
                    shard: r.shard,
                    entry: view.entry(*f),
                    shared,
                });
            }
        }
        reads.sort_by_key(|p| (p.shard, p.entry.offset));
        Ok(ReadPlan { reads })
    }

    /// Bytes of the frames the plan names (a shared factor named by several reads of one
    /// sample counts once).
    pub fn bytes(&self) -> u64 {
        let mut seen = std::collections::HashSet::new();
        self.reads
            .iter()
            .map(|r| {
                let s = r
                    .shared
                    .filter(|(_, e)| seen.insert((r.shard, e.offset)))
                    .map_or(0, |(_, e)| e.frame_len as u64);
                r.entry.frame_len as u64 + s
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(task: &str, id: SampleId, seq: u64) -> LogRecord {
        LogRecord {
            seq,
            shard: 0,
            table_offset: 0,
            table_len: 0,
            tokens: 1,
            loss_sum: 0.0,
            task: TaskName::new(task).unwrap(),
            id,
        }
    }

    #[test]
    fn rejects_duplicate_sample() {
        let e = Index::from_records([
            rec("math", SampleId::Int(3), 0),
            rec("math", SampleId::Int(3), 7),
        ])
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("math") && msg.contains('3') && msg.contains("seq 0 and 7"),
            "{msg}"
        );
    }

    #[test]
    fn samples_sorted_by_id_and_unknown_task_named() {
        let idx = Index::from_records([
            rec("a", SampleId::Str("x".into()), 0),
            rec("a", SampleId::Int(10), 1),
            rec("a", SampleId::Int(2), 2),
            rec("b", SampleId::Int(2), 3),
        ])
        .unwrap();
        let ids: Vec<_> = idx
            .samples("a")
            .unwrap()
            .iter()
            .map(|r| r.id.clone())
            .collect();
        assert_eq!(
            ids,
            vec![
                SampleId::Int(2),
                SampleId::Int(10),
                SampleId::Str("x".into())
            ]
        );
        let e = idx.samples("c").unwrap_err().to_string();
        assert!(e.contains("`c`") && e.contains("a, b"), "{e}");
    }
}
