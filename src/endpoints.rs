//! Which API endpoints are counted, in the order their rows are locked. The store, the
//! recent-window counters and the routes all index their per-endpoint figures by it.

/// The API endpoints whose accesses are counted. Their order is also the order in which a batch
/// locks their rows, which keeps concurrent replicas free of deadlocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CountedEndpoint {
    Root,
    Stats,
    Endpoints,
}

pub const COUNTED_ENDPOINTS: usize = 3;

impl CountedEndpoint {
    pub const ALL: [Self; COUNTED_ENDPOINTS] = [Self::Root, Self::Endpoints, Self::Stats];

    pub const fn path(self) -> &'static str {
        match self {
            Self::Root => "/",
            Self::Stats => "/stats",
            Self::Endpoints => "/api/v1/endpoints",
        }
    }

    /// Position in [`Self::ALL`], used to index per-endpoint arrays.
    pub const fn index(self) -> usize {
        match self {
            Self::Root => 0,
            Self::Endpoints => 1,
            Self::Stats => 2,
        }
    }

    pub fn from_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.path() == path)
    }
}

/// Per-endpoint quantities, indexed by [`CountedEndpoint::index`].
pub type PerEndpoint<T> = [T; COUNTED_ENDPOINTS];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_indices_follow_lock_order() {
        for (position, endpoint) in CountedEndpoint::ALL.iter().enumerate() {
            assert_eq!(endpoint.index(), position);
            assert_eq!(CountedEndpoint::from_path(endpoint.path()), Some(*endpoint));
        }
        assert_eq!(CountedEndpoint::from_path("/health"), None);
    }
}
