module goffsets

go 1.21
