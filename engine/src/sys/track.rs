//! Raw calls of the dirty-page trackers.
