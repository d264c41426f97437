//! UDP answers given from memory, kept as bytes for the same query again.
//!
//! An answer from the zone depends on the query's bytes after its ID (the
//! flags, the question as the client spelled it, its EDNS and so its UDP
//! size), the asker's view (its network) and the zone's generation, and on
//! nothing else: the same bytes from the same view in the same generation
//! get the same bytes back, but for the ID. A hit is answered without
//! parsing or encoding (hickory's per-query work, most of the server's own
//! CPU under load), by copying the kept answer behind the query's ID.
//! Forwarded answers are never kept (they are the upstream's, not ours).
//!
//! Each UDP worker keeps its own (no lock on the query path); it is bounded
//! and starts over when full or when the zone changes.

use std::{collections::HashMap, sync::Arc};

use hickory_proto::{op::ResponseCode, rr::RecordType};
use hickory_server::server::ResponseInfo;

/// Answers kept per worker at most (a few hundred KB).
pub const ENTRIES: usize = 4096;
/// Queries longer than this are not kept (a question and an OPT fit).
const MAX_QUERY: usize = 300;
/// Neither are answers longer than this.
const MAX_ANSWER: usize = 1232;
/// The DNS header's ID: the only bytes a kept answer does not fix.
const ID_LEN: usize = 2;

/// A kept answer: its bytes after the ID, and what /metrics counts for it.
struct Kept {
    answer: Box<[u8]>,
    qtype: RecordType,
    result: &'static str,
}

/// Kept answers by the query's bytes after its ID.
type ByQuery = HashMap<Box<[u8]>, Kept>;

/// One worker's kept answers.
#[derive(Default)]
pub struct AnswerCache {
    generation: u64,
    /// By the asker's view (None: `mesh`), then by the query's bytes after
    /// its ID. Views are few: a list.
    views: Vec<(Option<Arc<str>>, ByQuery)>,
    len: usize,
}

/// A kept answer for a query: write it out with [`Hit::write`].
pub struct Hit<'a> {
    kept: &'a Kept,
}

impl Hit<'_> {
    /// The answer to `query` (its ID, then the kept bytes) into `out`.
    pub fn write(&self, query: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&query[..ID_LEN]);
        out.extend_from_slice(&self.kept.answer);
    }

    /// The query type and result /metrics counts.
    pub fn counted(&self) -> (RecordType, &'static str) {
        (self.kept.qtype, self.kept.result)
    }
}

impl AnswerCache {
    /// The answer kept for `query` from `view` in zone generation
    /// `generation`; a newer generation first forgets every answer.
    pub fn get(&mut self, generation: u64, view: Option<&str>, query: &[u8]) -> Option<Hit<'_>> {
        if generation != self.generation {
            self.views.clear();
            self.len = 0;
            self.generation = generation;
            return None;
        }
        let tail = query.get(ID_LEN..)?;
        let (_, answers) = self.views.iter().find(|(v, _)| v.as_deref() == view)?;
        answers.get(tail).map(|kept| Hit { kept })
    }

    /// Keeps `answer`, given from memory to `query` from `view` with the
    /// zone at `generation` (read before answering), for the same query
    /// again. Only what the zone decided is kept: an answer, no data or
    /// no such name, and refusals of the message's form (NOTIMP,
    /// BADVERS); never an error of the moment (SERVFAIL, FORMERR).
    pub fn keep(
        &mut self,
        generation: u64,
        view: Option<Arc<str>>,
        query: &[u8],
        answer: &[u8],
        qtype: RecordType,
        info: &ResponseInfo,
    ) {
        if generation != self.generation
            || query.len() <= ID_LEN
            || query.len() > MAX_QUERY
            || answer.len() <= ID_LEN
            || answer.len() > MAX_ANSWER
        {
            return;
        }
        let result = match info.response_code {
            ResponseCode::NXDomain => "nxdomain",
            ResponseCode::NotImp => "notimp",
            ResponseCode::BADVERS => "badvers",
            ResponseCode::NoError if info.counts().answers == 0 => "nodata",
            ResponseCode::NoError => "answer",
            _ => return,
        };
        if self.len >= ENTRIES {
            self.views.clear();
            self.len = 0;
        }
        let at = match self.views.iter().position(|(v, _)| *v == view) {
            Some(i) => i,
            None => {
                self.views.push((view, HashMap::new()));
                self.views.len() - 1
            }
        };
        let kept = Kept {
            answer: answer[ID_LEN..].into(),
            qtype,
            result,
        };
        if self.views[at]
            .1
            .insert(query[ID_LEN..].into(), kept)
            .is_none()
        {
            self.len += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Header, MessageType, Metadata, OpCode};

    use super::*;

    fn info(code: ResponseCode, answers: u16) -> ResponseInfo {
        let mut metadata = Metadata::new(0, MessageType::Response, OpCode::Query);
        metadata.response_code = code;
        let mut h = Header {
            metadata,
            counts: Default::default(),
        };
        h.counts.answers = answers;
        ResponseInfo::from(h)
    }

    fn answer_of(c: &mut AnswerCache, g: u64, view: Option<&str>, q: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        c.get(g, view, q).map(|h| {
            h.write(q, &mut out);
            out
        })
    }

    #[test]
    fn the_same_query_gets_the_same_answer_with_its_own_id() {
        let mut c = AnswerCache::default();
        let (q1, q2) = (b"\x12\x34query-bytes", b"\xab\xcdquery-bytes");
        assert!(c.get(0, None, q1).is_none());
        let a = info(ResponseCode::NoError, 1);
        c.keep(0, None, q1, b"\x12\x34answer-bytes", RecordType::A, &a);
        assert_eq!(
            answer_of(&mut c, 0, None, q2).as_deref(),
            Some(&b"\xab\xcdanswer-bytes"[..])
        );
        let hit = c.get(0, None, q2).map(|h| h.counted());
        assert_eq!(hit, Some((RecordType::A, "answer")));
        // Another spelling, another view: not the same query.
        assert!(c.get(0, None, b"\x12\x34QUERY-bytes").is_none());
        assert!(c.get(0, Some("front"), q1).is_none());
    }

    #[test]
    fn views_generations_and_bounds_keep_answers_apart() {
        let mut c = AnswerCache::default();
        let q = b"\x00\x01q";
        let ok = info(ResponseCode::NoError, 1);
        c.keep(
            0,
            Some("front".into()),
            q,
            b"\x00\x01front",
            RecordType::A,
            &ok,
        );
        c.keep(0, None, q, b"\x00\x01mesh", RecordType::A, &ok);
        assert_eq!(
            answer_of(&mut c, 0, Some("front"), q).as_deref(),
            Some(&b"\x00\x01front"[..])
        );
        assert_eq!(
            answer_of(&mut c, 0, None, q).as_deref(),
            Some(&b"\x00\x01mesh"[..])
        );
        // The zone changed: nothing kept survives, and an answer made from
        // the old zone (its generation read before) is not kept.
        assert!(c.get(1, None, q).is_none());
        c.keep(0, None, q, b"\x00\x01old", RecordType::A, &ok);
        assert!(c.get(1, None, q).is_none());
        // Errors of the moment are not kept; negative answers are.
        c.keep(
            1,
            None,
            q,
            b"\x00\x01fail",
            RecordType::A,
            &info(ResponseCode::ServFail, 0),
        );
        assert!(c.get(1, None, q).is_none());
        c.keep(
            1,
            None,
            q,
            b"\x00\x01nx",
            RecordType::A,
            &info(ResponseCode::NXDomain, 0),
        );
        assert_eq!(
            c.get(1, None, q).map(|h| h.counted()),
            Some((RecordType::A, "nxdomain"))
        );
        // Bounded: past ENTRIES it starts over.
        for i in 0..=ENTRIES as u32 {
            let q = [&[0u8, 0][..], &i.to_be_bytes()].concat();
            c.keep(1, None, &q, b"\x00\x00a", RecordType::A, &ok);
        }
        assert!(c.len <= ENTRIES);
        // Too short to be a message: never a hit.
        assert!(c.get(1, None, b"\x00").is_none());
    }
}
