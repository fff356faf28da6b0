//! Raw syscalls for the epoll descriptor kinds (see fdkinds/).
