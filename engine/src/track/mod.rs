//! Dirty-page trackers (being written).
