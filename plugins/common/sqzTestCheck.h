/*
 * sqzTestCheck.h: the one check macro of the plain-C++ test programs (no test framework is needed
 * to build them, so CI and machines without GoogleTest run them alike).
 *
 * EXPECT(cond) records a failure with file and line and carries on, so one run reports every broken
 * rule; a test's main() returns sqz::test::failures() != 0.
 */
#pragma once

#include <iostream>

namespace sqz
{
namespace test
{

inline int& failures()
{
    static int count = 0;
    return count;
}

} // namespace test
} // namespace sqz

#define EXPECT(cond)                                                                                                   \
    do                                                                                                                 \
    {                                                                                                                  \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            std::cerr << __FILE__ << ":" << __LINE__ << ": expected " #cond << std::endl;                              \
            ++sqz::test::failures();                                                                                   \
        }                                                                                                              \
    } while (0)
