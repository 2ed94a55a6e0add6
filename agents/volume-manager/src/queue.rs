//! When a snapshot operation may start. Operations claim what they touch (their snapshot id and
//! the uuids of their volumes); two operations whose claims meet run in arrival order, others
//! run side by side, at most `limit` at once. A waiting operation keeps its claims, so a later
//! one cannot overtake it on a volume they share. Volume work (making or removing a volume)
//! starts at once, outside the line and the limit ([`Queue::start_now`]), and holds its claims
//! like a running operation. Pure bookkeeping: the manager decides what an operation claims and
//! runs it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use uuid::Uuid;

/// One thing an operation touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Claim {
    Snapshot(Uuid),
    /// A volume by its uuid: every generation of it, so a purge's old and new volumes are one.
    Volume(Uuid),
}

/// Everything an operation touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claims {
    Some(BTreeSet<Claim>),
    /// A barrier: it waits for everything before it, and everything after it waits for it.
    All,
}

impl Claims {
    pub fn holds(&self, claim: &Claim) -> bool {
        match self {
            Claims::All => true,
            Claims::Some(set) => set.contains(claim),
        }
    }
}

/// Several operations' claims as one: meeting the union is meeting one of them.
#[derive(Default)]
struct Union {
    any: bool,
    all: bool,
    set: BTreeSet<Claim>,
}

impl Union {
    fn add(&mut self, claims: &Claims) {
        self.any = true;
        match claims {
            Claims::All => self.all = true,
            Claims::Some(set) => self.set.extend(set.iter().copied()),
        }
    }

    /// Whether `wanted` shares a claim with any one of the claims added (a barrier meets any
    /// of them, and `All` meets everything).
    fn meets(&self, wanted: &Claims) -> bool {
        match wanted {
            Claims::All => self.any,
            Claims::Some(set) => self.all || !self.set.is_disjoint(set),
        }
    }
}

/// An operation's number in arrival order.
pub type OperationId = u64;

/// The operations waiting, in arrival order, and those running with their claims.
#[derive(Debug)]
pub struct Queue<T> {
    waiting: VecDeque<(OperationId, T)>,
    running: BTreeMap<OperationId, Claims>,
    /// Started with [`Self::start_now`]: they hold claims but do not count against `limit`.
    outside: BTreeMap<OperationId, Claims>,
    next: OperationId,
    limit: usize,
}

impl<T> Queue<T> {
    /// At most `limit` (at least 1) operations run at once.
    pub fn new(limit: usize) -> Self {
        Self {
            waiting: VecDeque::new(),
            running: BTreeMap::new(),
            outside: BTreeMap::new(),
            next: 0,
            limit: limit.max(1),
        }
    }

    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.max(1);
    }

    /// Queues an operation behind those that came before it.
    pub fn push(&mut self, operation: T) -> OperationId {
        let id = self.next;
        self.next += 1;
        self.waiting.push_back((id, operation));
        id
    }

    /// The waiting operations, in arrival order (for the caller to say what each claims).
    pub fn waiting(&self) -> impl Iterator<Item = &T> {
        self.waiting.iter().map(|(_, op)| op)
    }

    /// Takes the first waiting operation that may start now: its claims (`claims_of`, asked in
    /// arrival order and only as far as needed) meet neither a running operation's nor those of
    /// one that came before it and still waits. None while `limit` run. The claims before it are
    /// kept as one union: 10,000 queued snapshots (1,000 apps starting) were a quadratic scan
    /// at every start and every completion.
    pub fn take_ready(
        &mut self,
        mut claims_of: impl FnMut(&T) -> Claims,
    ) -> Option<(OperationId, T, Claims)> {
        if self.running.len() >= self.limit {
            return None;
        }
        let mut held = Union::default();
        for claims in self.held() {
            held.add(claims);
        }
        let mut ahead = Union::default();
        let mut found = None;
        for (index, (_, operation)) in self.waiting.iter().enumerate() {
            let wanted = claims_of(operation);
            if !held.meets(&wanted) && !ahead.meets(&wanted) {
                found = Some((index, wanted));
                break;
            }
            ahead.add(&wanted);
        }
        let (index, claims) = found?;
        let (id, operation) = self.waiting.remove(index)?;
        Some((id, operation, claims))
    }

    /// The operation taken by [`Self::take_ready`] runs now, holding `claims` until
    /// [`Self::finished`].
    pub fn started(&mut self, id: OperationId, claims: Claims) {
        self.running.insert(id, claims);
    }

    /// Starts an operation that never waits in line, holding `claims` until [`Self::finished`]:
    /// queued operations that meet them wait for it. The caller bounds how many run.
    pub fn start_now(&mut self, claims: Claims) -> OperationId {
        let id = self.next;
        self.next += 1;
        self.outside.insert(id, claims);
        id
    }

    pub fn finished(&mut self, id: OperationId) {
        self.running.remove(&id);
        self.outside.remove(&id);
    }

    /// The claims of every running operation, started from the line or not.
    fn held(&self) -> impl Iterator<Item = &Claims> {
        self.running.values().chain(self.outside.values())
    }

    /// Whether a running operation holds `claim`.
    pub fn busy(&self, claim: &Claim) -> bool {
        self.held().any(|held| held.holds(claim))
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.outside.is_empty() && self.waiting.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn on(claims: &[Claim]) -> Claims {
        Claims::Some(claims.iter().copied().collect())
    }

    fn ready(q: &mut Queue<&'static str>, claims: &[Claims]) -> Option<&'static str> {
        // Asked in arrival order: the n-th call is the n-th waiting operation's.
        let mut next = claims.iter();
        let (id, op, held) = q.take_ready(|_| next.next().cloned().unwrap_or(Claims::All))?;
        q.started(id, held);
        Some(op)
    }

    #[test]
    fn operations_on_different_volumes_start_together_up_to_the_limit() {
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let mut q = Queue::new(2);
        for op in ["a", "b", "c"] {
            q.push(op);
        }
        let claims = [
            on(&[Claim::Volume(a)]),
            on(&[Claim::Volume(b)]),
            on(&[Claim::Volume(c)]),
        ];
        assert_eq!(ready(&mut q, &claims), Some("a"));
        assert_eq!(ready(&mut q, &claims[1..]), Some("b"));
        assert_eq!(ready(&mut q, &claims[2..]), None, "the limit is 2");
        q.finished(0);
        assert_eq!(ready(&mut q, &claims[2..]), Some("c"));
    }

    #[test]
    fn an_operation_waits_for_an_earlier_one_on_the_same_volume_even_while_that_one_waits() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut q = Queue::new(4);
        q.push("create on a");
        assert_eq!(
            ready(&mut q, &[on(&[Claim::Volume(a)])]),
            Some("create on a")
        );
        q.push("snapshot of a and b");
        q.push("delete on b");
        q.push("create on c");
        let claims = [
            on(&[Claim::Volume(a), Claim::Volume(b)]),
            on(&[Claim::Volume(b)]),
            on(&[Claim::Volume(Uuid::from_u128(3))]),
        ];
        // The second waits for the first on a; the third for the second on b.
        assert_eq!(ready(&mut q, &claims), Some("create on c"));
        assert_eq!(ready(&mut q, &claims[..2]), None);
        assert!(q.busy(&Claim::Volume(a)) && !q.busy(&Claim::Volume(b)));
        q.finished(0);
        assert_eq!(ready(&mut q, &claims[..2]), Some("snapshot of a and b"));
        assert_eq!(ready(&mut q, &claims[1..2]), None);
        q.finished(1);
        assert_eq!(ready(&mut q, &claims[1..2]), Some("delete on b"));
    }

    #[test]
    fn a_barrier_waits_for_all_before_it_and_holds_all_after_it() {
        let mut q = Queue::new(4);
        q.push("one");
        assert_eq!(
            ready(&mut q, &[on(&[Claim::Snapshot(Uuid::from_u128(1))])]),
            Some("one")
        );
        q.push("barrier");
        q.push("two");
        let claims = [Claims::All, on(&[Claim::Snapshot(Uuid::from_u128(2))])];
        assert_eq!(ready(&mut q, &claims), None);
        q.finished(0);
        assert_eq!(ready(&mut q, &claims), Some("barrier"));
        assert_eq!(ready(&mut q, &claims[1..]), None);
        q.finished(1);
        assert_eq!(ready(&mut q, &claims[1..]), Some("two"));
        assert!(q.running() == 1 && !q.is_idle());
    }

    #[test]
    fn volume_work_started_at_once_holds_its_volume_but_not_a_place_under_the_limit() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut q = Queue::new(1);
        let making = q.start_now(on(&[Claim::Volume(a)]));
        q.push("snapshot of a");
        q.push("snapshot of b");
        let claims = [on(&[Claim::Volume(a)]), on(&[Claim::Volume(b)])];
        assert_eq!(
            ready(&mut q, &claims),
            Some("snapshot of b"),
            "the limit of 1 is free"
        );
        assert!(q.busy(&Claim::Volume(a)));
        q.finished(2);
        assert_eq!(ready(&mut q, &claims[..1]), None, "a is still being made");
        q.finished(making);
        assert_eq!(ready(&mut q, &claims[..1]), Some("snapshot of a"));
    }
}
